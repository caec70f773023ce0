"""Wan2.2-T2V-A14B and I2V-A14B in the resident torchrun group of a real h100x8 worker, on the CPU:
two ranks over gloo run the official code (``wan.WanT2V``, ``wan.WanI2V``, both experts and T5
sharded by FSDP, Ulysses over the two ranks, as on eight GPUs) on the small official checkpoints
(``testkit.small_models.a14b_official``), and rank 0 encodes the MP4 the worker stores.

One group serves both jobs, as it serves every group model: the text-to-video job comes from the
gpu80 queue (the worker is the only one, and an idle bigger class takes a smaller class's work),
the image-to-video one is routed to the h100x8 queue by the memory model because the 80 GB class
does not hold it. The real limits (720p past 177 frames) are routing's unit tests
(tests/unit/test_routing.py); a CPU cannot run a 720p clip, so here the client routes with a
margin that leaves the 80 GB card 20 GiB, less than one expert (26.9 GiB predicted), while a rank
of the group needs 16.2 GiB for both experts' and T5's shards: the same decision, at a size two
CPU ranks make in seconds. A third job, with the Lightning variant's LoRAs, which the group does
not apply, the worker runs as gpu80 does (diffusers in expert offload) on its own GPU.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw

from producer.client import Client
from routing import memory
from routing.catalog import get_model
from routing.classes import VramClass
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from routing.schemas import parse_request
from routing.settings import Settings
from testkit.s2v import A14B_GROUP_MODEL
from testkit.small_models.lora import build_lora
from tests import parallel
from worker.media import encode_png

# heavy: two CPU ranks take both cores while they compute (tests/parallel.py).
pytestmark = [pytest.mark.integration, *parallel.CPU_GROUP_MARKS]

T2V = "wan2.2-t2v-a14b"
I2V = "wan2.2-i2v-a14b"
# The margin that leaves an 80 GiB card 20 GiB (see the module docstring).
MARGIN_FOR_20_GIB = 60.0


@pytest.fixture
def group_logs(tmp_path: Path) -> Path:
    return tmp_path / "group-logs"


@pytest.fixture
def a14b_group_worker(start_worker, fleet_settings: Settings, group_logs: Path, small_models_dir: Path):
    """An h100x8 worker whose group (2 ranks, CPU, gloo) serves both A14B models, with stand-in
    Lightning LoRAs for T2V's experts."""
    variant_weights = {
        f"{T2V}:lightning-4{suffix}": str(
            build_lora(
                small_models_dir / T2V,
                T2V,
                group_logs.parent / f"lightning{suffix.replace(':', '-')}.safetensors",
                seed=seed,
                subfolder=subfolder,
            )
        )
        for suffix, subfolder, seed in (("", "transformer", 11), (":low", "transformer_2", 12))
    }
    settings = fleet_settings.model_copy(
        update={
            "variant_weights": variant_weights,
            "lora_cache_dir": group_logs.parent / "lora-cache",
            "worker_class": "h100x8",
            "group_models": [T2V, I2V],
            "group_world_size": 2,
            "group_timeout_s": 60,
            "group_start_timeout_s": 180,
            "group_log_dir": group_logs,
            # The ranks run the small official checkpoints on the CPU.
            "group_adapters": {T2V: A14B_GROUP_MODEL, I2V: A14B_GROUP_MODEL},
        }
    )
    return start_worker(settings)


def _picture() -> bytes:
    image = Image.new("RGB", (120, 80), (30, 100, 225))
    ImageDraw.Draw(image).ellipse((30, 10, 90, 70), fill=(225, 200, 30))
    return encode_png(image)


def _frames(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _rank_pids(log: str) -> list[int]:
    found = re.search(r"group ready: \d+ ranks, pids \[([\d, ]+)\]", log)
    assert found, log[-3000:]
    return [int(p) for p in found.group(1).split(",")]


def test_both_a14b_models_run_in_one_group_a_clip_the_80gb_class_does_not_hold_goes_there_loras_do_not(
    client: Client, a14b_group_worker, group_logs: Path, fleet_settings: Settings
):
    storage = LocalStorage(fleet_settings.storage_dir)
    text = {"model": T2V, "prompt": "a red fox runs", "width": 96, "height": 64, "frames": 9, "steps": 4}

    # 1. Text-to-video from the gpu80 queue, run by the idle h100x8 worker's group.
    t2v = client.submit(text)
    t2v_record = t2v.wait(timeout_s=300)

    assert t2v_record.status is JobStatus.SUCCEEDED, t2v_record.error
    assert t2v_record.queue == "gpu80" and t2v_record.worker.startswith("h100x8@")
    [output] = t2v_record.outputs
    assert output.content_type == "video/mp4"
    assert (output.width, output.height, output.frames, output.fps) == (96, 64, 9, 16)
    assert len(_frames(storage.get(output.key))) == 9
    # The official t2v-A14B: shift 12 puts 3 of 4 steps at or above the boundary (875).
    timings = t2v_record.timings
    assert (timings["tf32"], timings["attention_native"], timings["compile_regional"]) == (0, 1, 0)
    assert (timings["expert_high_steps"], timings["expert_low_steps"], timings["expert_boundary_t"]) == (
        3,
        1,
        875.0,
    )

    # 2. Image-to-video that the 80 GB class does not hold (by the client's margin): routed to
    #    the h100x8 queue, and run by the same group.
    request = {
        "model": I2V,
        "prompt": "the sun rises",
        "image": client.upload(_picture()),
        "width": 64,
        "height": 96,
        "frames": 5,
        "steps": 4,
    }
    tight = fleet_settings.model_copy(update={"vram_margin_gib": MARGIN_FOR_20_GIB})
    spec, work = get_model(I2V), memory.work_of(parse_request(request), get_model(I2V))
    assert not memory.fits(spec, VramClass.GPU80, work, MARGIN_FOR_20_GIB)
    assert memory.fits(spec, VramClass.H100X8, work, MARGIN_FOR_20_GIB)
    with Client(tight) as routed_by_memory:
        i2v = routed_by_memory.submit(request)
        i2v_record = i2v.wait(timeout_s=300)

    assert i2v_record.status is JobStatus.SUCCEEDED, i2v_record.error
    assert i2v_record.queue == "h100x8" and i2v_record.worker.startswith("h100x8@")
    [output] = i2v_record.outputs
    assert (output.width, output.height, output.frames, output.fps) == (64, 96, 5, 16)
    frames = _frames(storage.get(output.key))
    assert len(frames) == 5 and frames[0].shape == (96, 64, 3)
    assert (i2v_record.timings["expert_high_steps"], i2v_record.timings["expert_low_steps"]) == (2, 2)

    # 3. The Lightning variant (a LoRA on each expert), which the group cannot apply: from the
    #    gpu80 queue, the worker runs it as gpu80 does (diffusers, expert offload) on its own GPU.
    plain = {k: v for k, v in text.items() if k != "steps"}  # the variant sets its 4 steps
    lightning = client.submit(plain | {"variant": "lightning-4", "frames": 5})
    lightning_record = lightning.wait(timeout_s=300)
    assert lightning_record.status is JobStatus.SUCCEEDED, lightning_record.error
    assert lightning_record.queue == "gpu80" and lightning_record.worker.startswith("h100x8@")
    assert lightning_record.outputs[0].frames == 5
    assert (lightning_record.timings["expert_high_steps"], lightning_record.timings["expert_low_steps"]) == (
        2,
        2,
    )
    assert "expert_swap_s" in lightning_record.timings  # diffusers' ExpertPlacement, not the group

    # Both ranks ran both group jobs, in one group: one log, started once, never given the third.
    logs = sorted(group_logs.glob("group-*.log"))
    assert len(logs) == 1, logs
    log = logs[0].read_text(errors="replace")
    assert len(_rank_pids(log)) == 2
    for job, model in ((t2v.id, T2V), (i2v.id, I2V)):
        for rank in (0, 1):
            assert f"rank {rank} got job {job} ({model})" in log, log[-3000:]
            assert f"rank {rank} finished job {job}: ok" in log, log[-3000:]
    assert lightning.id not in log

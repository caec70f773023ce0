"""Wan2.2-T2V-A14B and I2V-A14B through the fleet: one real gpu80 worker process runs the small
two-expert models; each job's record says how many steps each expert ran, checked against the
scheduler's own timesteps and the repository's boundary. The Lightning variant runs with
stand-in LoRAs (one per expert), and a request's LoRA goes on the expert it names."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from diffusers import UniPCMultistepScheduler
from PIL import Image, ImageDraw

from localfleet.process import WorkerProcess
from producer.client import Client
from routing.catalog import CATALOG
from routing.errors import InvalidRequest
from routing.io.storage import LocalStorage
from routing.jobs.record import JobRecord, JobStatus
from routing.settings import Settings
from testkit.small_models.lora import build_lora
from tests.conftest import empty_queues
from worker.media import decode_video, encode_png

pytestmark = pytest.mark.integration

T2V = "wan2.2-t2v-a14b"
I2V = "wan2.2-i2v-a14b"
SMALL = {"prompt": "a red fox runs", "width": 64, "height": 64, "frames": 5, "seed": 7}


@pytest.fixture(scope="module")
def fleet(
    redis_url: str, small_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Client, LocalStorage, dict[str, bytes]]]:
    """One gpu80 worker for the module, with stand-in Lightning LoRAs for both models' experts,
    and request LoRAs to upload."""
    tmp = tmp_path_factory.mktemp("a14b")
    variant_weights = {}
    for key in (T2V, I2V):
        for suffix, subfolder, seed in (("", "transformer", 11), (":low", "transformer_2", 12)):
            out = tmp / f"{key}{suffix}.safetensors"
            path = build_lora(small_models_dir / key, key, out, seed=seed, subfolder=subfolder)
            variant_weights[f"{key}:lightning-4{suffix}"] = str(path)
    loras = {"style": build_lora(small_models_dir / T2V, T2V, tmp / "style.safetensors", seed=3).read_bytes()}
    empty_queues(redis_url)
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"test-{uuid.uuid4().hex[:8]}",
        storage_backend="local",
        storage_dir=tmp / "objects",
        model_root=small_models_dir,
        worker_class="gpu80",
        lora_cache_dir=tmp / "lora-cache",
        variant_weights=variant_weights,
    )
    worker = WorkerProcess(settings, tmp / "worker.log", {})
    try:
        worker.wait_ready()
        with Client(settings) as client:
            yield client, LocalStorage(settings.storage_dir), loras
    finally:
        worker.stop()


def run(client: Client, request: dict) -> JobRecord:
    record = client.submit(request).wait(timeout_s=300)
    assert record.status is JobStatus.SUCCEEDED, record.error
    return record


def frames_of(storage: LocalStorage, record: JobRecord) -> tuple[list[Image.Image], float]:
    [output] = record.outputs
    return decode_video(storage.get(output.key))


def high_noise_steps(model: str, steps: int, small_models_dir: Path, flow_shift: float | None = None) -> int:
    """Steps at or above the boundary timestep, from the repository's scheduler itself."""
    config = UniPCMultistepScheduler.load_config(small_models_dir / model / "scheduler")
    scheduler = UniPCMultistepScheduler.from_config(
        config, **({"flow_shift": flow_shift} if flow_shift else {})
    )
    scheduler.set_timesteps(steps)
    boundary = CATALOG[model].boundary_ratio * scheduler.config.num_train_timesteps
    return int(sum(float(t) >= boundary for t in scheduler.timesteps))


def test_text_to_video_runs_both_experts_and_says_which_ran_which_steps(fleet, small_models_dir):
    client, storage, _ = fleet
    record = run(client, {"model": T2V, **SMALL, "steps": 6})
    high = high_noise_steps(T2V, 6, small_models_dir)
    assert 0 < high < 6
    timings = record.timings
    assert (timings["expert_high_steps"], timings["expert_low_steps"]) == (high, 6 - high)
    assert timings["expert_boundary_t"] == 875.0 and timings["expert_swap_s"] >= 0
    assert record.request["guidance_scale"] == 4.0 and record.request["guidance_scale_2"] == 3.0
    frames, fps = frames_of(storage, record)
    assert len(frames) == 5 and frames[0].size == (64, 64) and fps == 16


def test_image_to_video_starts_from_its_image(fleet, small_models_dir):
    client, storage, _ = fleet

    def picture(hue: int) -> bytes:
        image = Image.new("RGB", (64, 64), (hue, 100, 255 - hue))
        ImageDraw.Draw(image).ellipse((16, 8, 48, 56), fill=(255 - hue, 200, hue))
        return encode_png(image)

    base = {"model": I2V, **SMALL, "steps": 6}
    first = run(client, base | {"image": client.upload(picture(30))})
    second = run(client, base | {"image": client.upload(picture(220))})
    high = high_noise_steps(I2V, 6, small_models_dir)
    assert (first.timings["expert_high_steps"], first.timings["expert_low_steps"]) == (high, 6 - high)
    assert first.timings["expert_boundary_t"] == 900.0
    a, _ = frames_of(storage, first)
    b, _ = frames_of(storage, second)
    assert np.mean(np.any(np.asarray(a[0]) != np.asarray(b[0]), axis=-1)) > 0.1


def test_the_lightning_variant_runs_four_steps_with_a_lora_on_each_expert(fleet, small_models_dir):
    client, storage, _ = fleet
    record = run(client, {"model": T2V, **SMALL, "variant": "lightning-4"})
    assert record.request["steps"] == 4
    assert record.request["guidance_scale"] == record.request["guidance_scale_2"] == 1.0
    high = high_noise_steps(T2V, 4, small_models_dir, flow_shift=5.0)
    assert (
        (record.timings["expert_high_steps"], record.timings["expert_low_steps"])
        == (high, 4 - high)
        == (2, 2)
    )
    # The same job without the distillation LoRAs makes another video.
    plain = run(client, {"model": T2V, **SMALL, "steps": 4, "guidance_scale": 1.0, "guidance_scale_2": 1.0})
    assert frames_of(storage, record)[0][0].tobytes() != frames_of(storage, plain)[0][0].tobytes()


def test_a_request_lora_goes_on_the_expert_it_names(fleet):
    client, storage, loras = fleet
    key = client.upload(loras["style"])["key"]
    # Eight steps, four for each expert, and a strong scale: a random-weight model's high-noise
    # steps come first and the low-noise ones redo much of their detail, so a weak change there
    # would not survive the video encoding. Lossless encoding keeps what does.
    request = {"model": T2V, **SMALL, "steps": 8, "video_crf": 0}

    def video(extra: dict) -> bytes:
        return b"".join(frame.tobytes() for frame in frames_of(storage, run(client, request | extra))[0])

    base = video({})
    on = {
        expert: video({"loras": [{"source": key, "expert": expert, "scale": 4.0}]})
        for expert in ("high", "low")
    }
    assert len({base, on["high"], on["low"]}) == 3  # each expert's LoRA changes the video its own way
    assert video({}) == base  # both slots empty again after the job


def test_expert_and_guidance_scale_2_are_refused_for_one_transformer_models(fleet):
    client, _, _ = fleet

    with pytest.raises(InvalidRequest) as raised:
        client.submit(
            {"model": "wan2.2-ti2v-5b", "kind": "text-to-video", "prompt": "x", "guidance_scale_2": 2.0}
        )
    assert raised.value.errors[0].field == "guidance_scale_2"
    with pytest.raises(InvalidRequest) as raised:
        client.submit({"model": T2V, **SMALL, "guidance_scale": 1.0, "guidance_scale_2": 3.0})
    assert "needs guidance_scale above 1" in raised.value.errors[0].message

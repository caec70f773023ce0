"""What a job runs with, on the real small Z-Image (eager, CPU): FP8 linear layers and CUDA graphs
asked for on a device without them, and the text encoder's compile on an eager profile, are not
applied and the reason is logged; the text encoder's layers to compile are its language layers,
not a vision tower's; the torchrun group's TF32 and SDPA kernel follow the settings, are put back
after a job and fall back on the CPU saying why; a warm-up size that runs out of GPU memory is
skipped, saying so, and the load goes on; a base job runs
with the LoRA slot off (every wrapped layer computes its base weights alone) and a LoRA job with
it on; every job's timings name the techniques it ran."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routing.catalog import CATALOG
from routing.classes import VramClass
from routing.io.storage import LocalStorage
from routing.schemas import parse_request
from routing.settings import Settings
from testkit.small_models.lora import build_lora
from tests.loras import resolved
from worker.adapters.base import Runtime
from worker.adapters.z_image import ZImageAdapter
from worker.speed import job_context, prepare

SPEC = CATALOG["z-image-turbo"]
RUNTIME = Runtime(device="cpu", dtype=torch.float32)


def test_fp8_and_cuda_graphs_asked_for_on_the_cpu_run_without_and_say_why(
    small_models_dir: Path, tmp_path: Path, caplog: Any
) -> None:
    adapter = ZImageAdapter(SPEC, str(small_models_dir / SPEC.key), RUNTIME)
    settings = Settings(
        fp8="on",
        cuda_graphs="on",
        compile_text_encoder="on",
        lora_cache_dir=tmp_path / "cache",
        lora_max_rank=8,
    )
    with caplog.at_level(logging.WARNING, logger="worker.speed"):
        speed = prepare(adapter, SPEC, VramClass.GPU80, settings)

    assert not speed.fp8 and not speed.cuda_graphs and not speed.text_encoder_compiled
    assert "FP8 asked for, runs bf16: FP8 GEMMs need a CUDA device, not cpu" in caplog.text
    assert "CUDA graphs asked for, runs without: CUDA graphs need a CUDA device, not cpu" in caplog.text
    assert "text encoder compile asked for, runs eager: the profile runs eager" in caplog.text
    request, timings = parse_request({"model": SPEC.key, "prompt": "a fox", "width": 64, "height": 64}), {}
    with job_context(adapter, request, LocalStorage(tmp_path / "objects"), timings):
        adapter.run(request.model_copy(update={"steps": 1}), {}, lambda done, total: None)
    assert timings["fp8_linear"] == 0 and timings["cuda_graphs"] == 0 and timings["compile_text_encoder"] == 0
    assert timings["compile_regional"] == 0 and timings["attention_native"] == 1
    assert timings["lora_slot"] == 0


def test_the_lora_slot_is_on_only_for_a_job_with_loras(small_models_dir: Path, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "objects")
    lora = build_lora(small_models_dir / SPEC.key, SPEC.key, tmp_path / "style.safetensors")
    storage.put("uploads/_/style.safetensors", lora.read_bytes(), "application/octet-stream")
    never_had_one = ZImageAdapter(SPEC, str(small_models_dir / SPEC.key), RUNTIME)
    adapter = ZImageAdapter(SPEC, str(small_models_dir / SPEC.key), RUNTIME)
    speed = prepare(
        adapter, SPEC, VramClass.GPU80, Settings(lora_cache_dir=tmp_path / "cache", lora_max_rank=8)
    )
    layers = speed.slot.layers
    assert layers and all(layer._disable_adapters for layer in layers)  # off from the start

    data = {"model": SPEC.key, "prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 5}
    styled = resolved(parse_request(data | {"loras": [{"source": "uploads/_/style.safetensors"}]}), storage)

    def run(on: Any, request: Any) -> tuple[np.ndarray, dict[str, float], set[bool]]:
        seen: set[bool] = set()
        timings: dict[str, float] = {}
        with job_context(on, request, storage, timings):
            image = on.run(
                request, {}, lambda done, total: seen.update(not x._disable_adapters for x in layers)
            )
        return np.asarray(image.images[0]), timings, seen

    reference, _, _ = run(never_had_one, parse_request(data))
    base, timings, seen = run(adapter, parse_request(data))
    assert seen == {False} and timings["lora_slot"] == 0
    assert np.array_equal(base, reference)  # bit for bit the model that never had a slot
    with_lora, timings, seen = run(adapter, styled)
    assert seen == {True} and timings["lora_slot"] == 1
    assert np.abs(with_lora.astype(int) - reference.astype(int)).max() > 10
    assert all(layer._disable_adapters for layer in layers)  # off again after the job
    after, timings, _ = run(adapter, parse_request(data))
    assert np.array_equal(after, reference) and timings["lora_slot"] == 0


def test_the_text_encoders_layers_to_compile_are_its_language_layers(small_models_dir: Path) -> None:
    """Qwen2.5-VL has two lists of like layers, the vision tower's blocks and the language model's
    decoder layers: the heavier, the language layers, are the ones a text prompt runs through."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from worker.speed import repeated_layers

    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(small_models_dir / "qwen-image"), subfolder="text_encoder"
    )
    layers = repeated_layers(encoder)
    assert layers and all(type(layer).__name__ == "Qwen2_5_VLDecoderLayer" for layer in layers)
    assert len(layers) == encoder.config.text_config.num_hidden_layers
    assert repeated_layers(None) == []


def test_the_groups_speed_follows_the_settings_and_falls_back_on_the_cpu_saying_why(caplog: Any) -> None:
    """The official code in the torchrun group: TF32 and the SDPA kernel its attention prefers,
    set for a job and put back after it, named in the job's timings; what the CPU lacks is not
    applied, and the log says why."""
    from torch.nn.attention import SDPBackend

    from worker.adapters.official_group import GroupSpeed, group_speed

    s2v = CATALOG["wan2.2-s2v-14b"]
    assert group_speed(s2v, "cpu", Settings()) == GroupSpeed(tf32=False, attention="native")
    assert GroupSpeed().timings() == {"compile_regional": 0.0, "tf32": 0.0, "attention_native": 1.0}
    with caplog.at_level(logging.WARNING, logger="worker.adapters.official_group"):
        cpu = group_speed(s2v, "cpu", Settings(tf32="on", attention_backend="_native_cudnn"))
    assert cpu == GroupSpeed(tf32=False, attention="native")
    assert "TF32 asked for, runs without: TF32 needs a CUDA device, not cpu" in caplog.text
    assert "_native_cudnn" in caplog.text and "SDPA chooses" in caplog.text
    # On a GPU the settings are taken as they are.
    assert group_speed(s2v, "cuda:0", Settings(tf32="on", attention_backend="_native_cudnn")) == GroupSpeed(
        tf32=True, attention="_native_cudnn"
    )

    tf32_before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    order_before = torch._C._get_sdp_priority_order()
    with GroupSpeed(tf32=True, attention="_native_math").applied():
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        # Preferred first, the others after it: a call the kernel cannot serve still runs.
        order = torch._C._get_sdp_priority_order()
        assert order[0] == SDPBackend.MATH.value and SDPBackend.FLASH_ATTENTION.value in order
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32_before
    assert torch._C._get_sdp_priority_order() == order_before
    assert GroupSpeed(tf32=True, attention="_native_cudnn").timings()["attention__native_cudnn"] == 1.0


def test_a_warm_up_size_out_of_gpu_memory_is_skipped_saying_so_and_the_load_goes_on(caplog: Any) -> None:
    """The GPU is the one thing here that cannot be real: the adapter stands in for a pipeline that
    runs out of its memory at one size (torch's own error type, as CUDA raises it)."""
    import pytest

    from worker.speed import Speed, warm_up

    class Warming:
        def __init__(self, fail_at: tuple[int, int], error: Exception):
            self.ran: list[tuple[int, int]] = []
            self.fail_at, self.error = fail_at, error

        def run(self, request: Any, inputs: Any, on_step: Any) -> None:
            self.ran.append((request.width, request.height))
            if self.ran[-1] == self.fail_at:
                raise self.error

    sizes = [(1024, 1024, 0), (768, 1344, 0), (1344, 768, 0)]
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    adapter, speed = Warming((768, 1344), oom), Speed(SPEC.key, compiled=True, attention="native")
    with caplog.at_level(logging.WARNING, logger="worker.speed"):
        warm_up(adapter, SPEC, sizes, speed)
    assert adapter.ran == [(1024, 1024), (768, 1344), (1344, 768)]
    assert speed.warmed == [(1024, 1024, 0), (1344, 768, 0)]
    assert (
        "z-image-turbo: warm-up at 768x1344 ran out of GPU memory, skipped: CUDA out of memory" in caplog.text
    )
    # Any other error is the model's: the load fails with it.
    with pytest.raises(ValueError, match="broken"):
        warm_up(Warming((768, 1344), ValueError("broken")), SPEC, sizes, Speed(SPEC.key, True, "native"))

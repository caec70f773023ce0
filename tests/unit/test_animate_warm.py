"""Wan2.2-Animate-14B warmed as the other compiled models are, on the small model, CPU, inductor:
the warm-up runs move jobs on made-up driving videos at both sizes, after which a move job, a mix
job and a job at a size never warmed compile nothing, and the output is eager's within 2 levels.
The Animate transformer's attention (its own WanAttention class) runs fused QKV projections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from routing.catalog import CATALOG
from routing.classes import VramClass
from routing.io.storage import LocalStorage
from routing.schemas import parse_request
from routing.settings import Settings
from worker.adapters.base import Runtime
from worker.adapters.wan import WanAnimateAdapter
from worker.speed import job_context, prepare

pytestmark = pytest.mark.timeout(1200)

SPEC = CATALOG["wan2.2-animate-14b"]
RUNTIME = Runtime(device="cpu", dtype=torch.float32)
# Apart in width, height and frames, as the catalog's (routing/catalog.py's warm_sizes).
WARM = [(96, 64, 9), (64, 96, 5)]


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _job(width: int, height: int, frames: int, mode: str = "move") -> tuple[Any, dict[str, Any]]:
    names = ["image", "pose_video", "face_video"] + (
        ["background_video", "mask_video"] if mode == "mix" else []
    )
    data = {"model": SPEC.key, "kind": "animate", "mode": mode, "prompt": "a person dancing"}
    data |= {"width": width, "height": height, "frames": frames, "steps": 2, "seed": 7}
    data |= {name: {"key": f"inputs/{name}"} for name in names}
    inputs: dict[str, Any] = {"image": _noise((40, 56), 1)}
    for index, name in enumerate(names[1:]):
        inputs[name] = [_noise((width, height), 10 * index + i) for i in range(frames)]
    return parse_request(data), inputs


def _run(adapter: Any, job: tuple[Any, dict[str, Any]], storage: Any) -> tuple[np.ndarray, dict[str, float]]:
    request, inputs = job
    timings: dict[str, float] = {}
    with job_context(adapter, request, storage, timings):
        video = adapter.run(request, inputs, lambda step, total: None)
    return np.stack([np.asarray(frame) for frame in video.frames]).astype(int), timings


def test_animate_is_warmed_and_then_compiles_nothing(small_models_dir: Path, tmp_path: Path) -> None:
    weights = str(small_models_dir / SPEC.key)
    settings = Settings(
        compile_profile="compile",
        fused_qkv="on",
        warm_sizes={SPEC.key: WARM},
        lora_cache_dir=tmp_path / "lora-cache",
        lora_max_rank=8,
    )
    storage = LocalStorage(tmp_path / "objects")
    compiled = WanAnimateAdapter(SPEC, weights, RUNTIME)
    speed = prepare(compiled, SPEC, VramClass.GPU80, settings)
    assert speed.compiled and speed.warmed == WARM and speed.fused
    assert {type(m).__module__ for m in speed.fused} == {
        "diffusers.models.transformers.transformer_wan_animate"
    }
    eager = WanAnimateAdapter(SPEC, weights, RUNTIME)
    prepare(
        eager,
        SPEC,
        VramClass.GPU80,
        settings.model_copy(update={"compile_profile": "eager", "fused_qkv": "off"}),
    )

    for job in (_job(96, 64, 9), _job(96, 64, 9, mode="mix"), _job(128, 80, 13)):
        video, timings = _run(compiled, job, storage)
        assert timings["compiled_graphs"] == 0 and timings["compile_regional"] == 1
        assert timings["fused_qkv"] == 1
        reference, _ = _run(eager, job, storage)
        assert np.abs(video - reference).max() <= 2

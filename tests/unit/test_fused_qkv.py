"""Fused QKV projections (FLEET_FUSED_QKV, worker/fused.py) on the small Wan2.2-TI2V-5B, CPU:
the fused layers share their parts' storage (no memory), a base job runs them and gives the
unfused model's video, a LoRA job runs the parts through the slot and gives the unfused model's
LoRA video, FastWan's checkpoint swaps into both, the model's own video is bit for bit the same
after each; a model that moves between devices, FP8 layers and a transformer without an attention
that runs fused run unfused, saying why. Compiled (inductor): fused and slot states are both warmed, so
no job compiles."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from routing.catalog import CATALOG
from routing.classes import VramClass
from routing.io.storage import LocalStorage
from routing.schemas import parse_request
from routing.settings import Settings
from testkit.small_models.lora import build_checkpoint, build_lora
from tests.loras import calls, resolved
from worker.adapters.base import Runtime
from worker.adapters.wan import WanTI2VAdapter
from worker.speed import fused_qkv_refused, job_context, prepare

pytestmark = pytest.mark.timeout(1200)

SPEC = CATALOG["wan2.2-ti2v-5b"]
RUNTIME = Runtime(device="cpu", dtype=torch.float32)
BASE = {
    "model": SPEC.key,
    "kind": "text-to-video",
    "prompt": "a red fox",
    "width": 64,
    "height": 64,
    "frames": 5,
    "seed": 7,
    "steps": 2,
}
# Two sizes that differ in width, height and frames: the compiled blocks are warmed shape-dynamic
# in all three (a dimension the two shared would stay a constant: routing/catalog.py's warm_sizes).
WARM = [(64, 96, 5), (96, 64, 9)]


def _frames(adapter: Any, request: Any, storage: Any) -> tuple[np.ndarray, dict[str, float]]:
    timings: dict[str, float] = {}
    with job_context(adapter, request, storage, timings):
        video = adapter.run(request, {}, lambda step, total: None)
    return np.stack([np.asarray(frame) for frame in video.frames]).astype(int), timings


def _storage_bytes(transformer: Any) -> int:
    """The bytes of the transformer's own weights (not the LoRA slot's), each storage once."""
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
        for n, p in transformer.named_parameters()
        if "lora_" not in n
    }
    return sum(storages.values())


@pytest.fixture(scope="module")
def setup(small_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fused")
    model_dir = small_models_dir / SPEC.key
    storage = LocalStorage(tmp / "objects")
    lora = build_lora(model_dir, SPEC.key, tmp / "style.safetensors", seed=2)
    storage.put("uploads/_/style.safetensors", lora.read_bytes(), "application/octet-stream")
    checkpoint = build_checkpoint(model_dir, tmp / "fastwan", seed=3)
    settings = Settings(
        compile_profile="eager",
        lora_cache_dir=tmp / "lora-cache",
        lora_max_rank=8,
        variant_weights={f"{SPEC.key}:fastwan-3": str(checkpoint)},
    )
    plain = WanTI2VAdapter(SPEC, str(model_dir), RUNTIME)
    plain_speed = prepare(plain, SPEC, VramClass.GPU80, settings)
    fused = WanTI2VAdapter(SPEC, str(model_dir), RUNTIME)
    speed = prepare(fused, SPEC, VramClass.GPU80, settings.model_copy(update={"fused_qkv": "on"}))
    styled = resolved(parse_request(BASE | {"loras": [{"source": "uploads/_/style.safetensors"}]}), storage)
    return {
        "plain": plain,
        "plain_speed": plain_speed,
        "fused": fused,
        "speed": speed,
        "storage": storage,
        "settings": settings,
        "styled": styled,
        "checkpoint": checkpoint,
    }


def test_the_fused_layers_hold_their_parts_weights_and_cost_no_memory(setup):
    speed, transformer = setup["speed"], setup["fused"].pipeline.transformer
    attentions = [m for m in transformer.modules() if type(m).__name__ == "WanAttention"]
    assert speed.fused == attentions and len(attentions) == 2 * len(transformer.blocks)
    for module in attentions:
        fused, parts = (
            (module.to_kv, ["to_k", "to_v"])
            if module.is_cross_attention
            else (module.to_qkv, ["to_q", "to_k", "to_v"])
        )
        whole = torch.cat([getattr(module, part).weight for part in parts])
        assert torch.equal(whole, fused.weight)
        for part in parts:  # a view of the fused weight (peft wraps the part for the slot)
            weight = getattr(module, part).base_layer.weight
            assert weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    plain = setup["plain"].pipeline.transformer
    assert _storage_bytes(transformer) == _storage_bytes(plain)
    assert speed.extra_bytes == setup["plain_speed"].extra_bytes


def test_a_base_job_runs_the_fused_layers_and_gives_the_unfused_models_video(setup):
    attention = setup["fused"].pipeline.transformer.blocks[0].attn1
    fused_calls, part_calls = calls(attention.to_qkv), calls(attention.to_q)
    request = parse_request(BASE)
    video, timings = _frames(setup["fused"], request, setup["storage"])
    assert fused_calls and not part_calls
    assert timings["fused_qkv"] == 1 and timings["lora_slot"] == 0
    reference, timings = _frames(setup["plain"], request, setup["storage"])
    assert timings["fused_qkv"] == 0
    assert np.abs(video - reference).max() <= 1


def test_a_lora_job_runs_the_parts_through_the_slot_and_the_base_comes_back(setup):
    adapter, storage = setup["fused"], setup["storage"]
    before, _ = _frames(adapter, parse_request(BASE), storage)
    attention = adapter.pipeline.transformer.blocks[0].attn1
    fused_calls, part_calls = calls(attention.to_qkv), calls(attention.to_q)
    styled, timings = _frames(adapter, setup["styled"], storage)
    assert part_calls and not fused_calls
    assert timings["fused_qkv"] == 0 and timings["lora_slot"] == 1
    reference, _ = _frames(setup["plain"], setup["styled"], storage)
    assert np.abs(styled - reference).max() <= 1 and np.abs(styled - before).max() > 10
    after, timings = _frames(adapter, parse_request(BASE), storage)
    assert np.array_equal(after, before) and timings["fused_qkv"] == 1


def test_a_checkpoint_variant_swaps_into_the_fused_layers_too(setup):
    adapter, storage = setup["fused"], setup["storage"]
    before, _ = _frames(adapter, parse_request(BASE), storage)
    fast_request = parse_request(BASE | {"variant": "fastwan-3", "steps": 3})
    fast, timings = _frames(adapter, fast_request, storage)
    assert timings["variant_checkpoint"] == 1 and timings["fused_qkv"] == 1
    reference, _ = _frames(setup["plain"], fast_request, storage)
    assert np.abs(fast - reference).max() <= 1 and np.abs(fast - before).max() > 10
    # Read into the fused layout: its parts are views of its fused weights, counted once.
    variant = setup["speed"].checkpoints["fastwan-3"]
    assert variant.nbytes == setup["plain_speed"].checkpoints["fastwan-3"].nbytes
    after, _ = _frames(adapter, parse_request(BASE), storage)
    assert np.array_equal(after, before)


def test_fused_qkv_runs_unfused_where_it_cannot_and_says_why(setup, small_models_dir: Path, caplog: Any):
    settings = setup["settings"].model_copy(update={"fused_qkv": "on"})
    moving = Runtime(device="cpu", dtype=torch.float32, offload=True)
    with caplog.at_level(logging.WARNING, logger="worker.speed"):
        offloaded = WanTI2VAdapter(SPEC, str(small_models_dir / SPEC.key), moving)
        speed = prepare(offloaded, SPEC, VramClass.GPU80, settings)
    assert not speed.fused
    assert "fused QKV asked for, runs unfused: the model moves between host memory and the GPU" in caplog.text
    # Every diffusers transformer the catalog serves has one (Qwen-Image's and Z-Image's:
    # tests/unit/test_fused_attention.py); a module with no attention has none.
    no_attention = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert "no attention that runs fused" in fused_qkv_refused(RUNTIME, False, [no_attention])
    _, timings = _frames(offloaded, parse_request(BASE), setup["storage"])
    assert timings["fused_qkv"] == 0
    experts = Runtime(device="cpu", dtype=torch.float32, expert_offload=True)
    transformer = setup["plain"].pipeline.transformer
    assert "moves between host memory and the GPU" in fused_qkv_refused(experts, False, [transformer])
    assert "FP8 linear layers" in fused_qkv_refused(RUNTIME, True, [transformer])
    assert fused_qkv_refused(RUNTIME, False, [transformer]) is None


def test_compiled_fused_and_slot_states_are_both_warmed(setup, small_models_dir: Path):
    """Inductor: a base job (fused), a LoRA job (the parts through the slot), FastWan's checkpoint
    swapped in, and sizes never warmed, base and LoRA, compile nothing; the base job after them is
    bit for bit the one before."""
    adapter = WanTI2VAdapter(SPEC, str(small_models_dir / SPEC.key), RUNTIME)
    settings = setup["settings"].model_copy(
        update={"compile_profile": "compile", "fused_qkv": "on", "warm_sizes": {SPEC.key: WARM}}
    )
    speed = prepare(adapter, SPEC, VramClass.GPU80, settings)
    assert speed.compiled and speed.fused and speed.warmed == WARM
    storage = setup["storage"]
    before, timings = _frames(adapter, parse_request(BASE), storage)
    assert timings["compiled_graphs"] == 0 and timings["fused_qkv"] == 1 and timings["compile_regional"] == 1
    eager, _ = _frames(setup["plain"], parse_request(BASE), storage)
    assert np.abs(before - eager).max() <= 2
    styled, timings = _frames(adapter, setup["styled"], storage)
    assert timings["compiled_graphs"] == 0 and timings["lora_slot"] == 1 and timings["fused_qkv"] == 0
    assert np.abs(styled - before).max() > 10
    fast, timings = _frames(adapter, parse_request(BASE | {"variant": "fastwan-3", "steps": 3}), storage)
    assert timings["compiled_graphs"] == 0 and timings["variant_checkpoint"] == 1
    for width, height, frames in ((128, 96, 13), (64, 64, 17)):  # never warmed: new in every dimension
        new_size = BASE | {"width": width, "height": height, "frames": frames}
        _, timings = _frames(adapter, parse_request(new_size), storage)
        assert timings["compiled_graphs"] == 0
        _, timings = _frames(adapter, setup["styled"].model_copy(update=new_size), storage)
        assert timings["compiled_graphs"] == 0 and timings["lora_slot"] == 1
    after, timings = _frames(adapter, parse_request(BASE), storage)
    assert np.array_equal(after, before) and timings["compiled_graphs"] == 0

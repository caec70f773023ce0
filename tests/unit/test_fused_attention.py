"""Fused QKV projections on Qwen-Image and Z-Image (worker/fused_attention.py: the fleet's
processors, which read diffusers' ``fused_projections``), on the small models, CPU: every attention
gets one, its fused layers share their parts' storage, a base job runs them and gives the unfused
model's image (cached too), a LoRA job runs the parts through the slot and gives the unfused
model's LoRA image, and the base image is bit for bit the same after it. Traced by dynamo (eager backend,
full graph: the processors must not break a compiled block), both states are warmed and no job
compiles."""

from __future__ import annotations

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
from testkit.small_models.lora import build_lora
from tests.loras import calls, resolved
from worker.adapters.base import Runtime
from worker.adapters.qwen_image import QwenImageAdapter, QwenImageEditPlusAdapter
from worker.adapters.z_image import ZImageAdapter
from worker.fused_attention import FusedQwenDoubleStreamAttnProcessor, FusedZSingleStreamAttnProcessor
from worker.speed import job_context, prepare

pytestmark = pytest.mark.timeout(900)

RUNTIME = Runtime(device="cpu", dtype=torch.float32)
# model key: the adapter, the fleet's processor, and the fused layers of each attention.
MODELS = {
    "z-image-turbo": (ZImageAdapter, FusedZSingleStreamAttnProcessor, ("to_qkv",)),
    "qwen-image": (QwenImageAdapter, FusedQwenDoubleStreamAttnProcessor, ("to_qkv", "to_added_qkv")),
}
PARTS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _request(key: str, width: int = 64, height: int = 64, **extra: Any) -> Any:
    data = {"model": key, "prompt": "a red fox", "width": width, "height": height, "steps": 2, "seed": 3}
    return parse_request(data | extra)


def _run(adapter: Any, request: Any, storage: Any, inputs: Any = None) -> tuple[np.ndarray, dict[str, float]]:
    timings: dict[str, float] = {}
    with job_context(adapter, request, storage, timings):
        image = adapter.run(request, inputs or {}, lambda step, total: None).images[0]
    return np.asarray(image).astype(int), timings


def _attentions(transformer: Any) -> list[Any]:
    return [m for m in transformer.modules() if type(m).__name__ == "Attention"]


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request: Any, small_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    key = request.param
    spec, (adapter_class, processor, fused_layers) = CATALOG[key], MODELS[key]
    tmp = tmp_path_factory.mktemp("fused-attention")
    weights = str(small_models_dir / key)
    storage = LocalStorage(tmp / "objects")
    lora = build_lora(small_models_dir / key, key, tmp / "style.safetensors", seed=2)
    storage.put("uploads/_/style.safetensors", lora.read_bytes(), "application/octet-stream")
    settings = Settings(compile_profile="eager", lora_cache_dir=tmp / "lora-cache", lora_max_rank=8)
    plain = adapter_class(spec, weights, RUNTIME)
    prepare(plain, spec, VramClass.GPU80, settings)
    fused = adapter_class(spec, weights, RUNTIME)
    speed = prepare(fused, spec, VramClass.GPU80, settings.model_copy(update={"fused_qkv": "on"}))
    styled = resolved(_request(key, loras=[{"source": "uploads/_/style.safetensors", "scale": 4.0}]), storage)
    return {
        "key": key,
        "plain": plain,
        "fused": fused,
        "speed": speed,
        "processor": processor,
        "fused_layers": fused_layers,
        "storage": storage,
        "settings": settings,
        "styled": styled,
    }


def test_every_attention_runs_the_fleets_processor_and_its_fused_layers_are_views(setup):
    transformer = setup["fused"].pipeline.transformer
    attentions = _attentions(transformer)
    assert attentions and setup["speed"].fused == attentions
    for module in attentions:
        assert type(module.processor) is setup["processor"]
        for name in setup["fused_layers"]:
            fused = getattr(module, name)
            parts = [getattr(module, part) for part in PARTS[name]]
            assert torch.equal(torch.cat([part.weight for part in parts]), fused.weight)
            for part in parts:  # a view of the fused weight (peft wraps the part for the slot)
                weight = part.base_layer.weight
                assert weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    plain = _attentions(setup["plain"].pipeline.transformer)
    assert all(type(module.processor) is not setup["processor"] for module in plain)


def test_a_base_job_runs_the_fused_layers_and_gives_the_unfused_models_image(setup):
    attention = _attentions(setup["fused"].pipeline.transformer)[0]
    fused_calls = [calls(getattr(attention, name)) for name in setup["fused_layers"]]
    part_calls = calls(attention.to_q)
    request = _request(setup["key"])
    image, timings = _run(setup["fused"], request, setup["storage"])
    assert all(fused_calls) and not part_calls
    assert timings["fused_qkv"] == 1 and timings["lora_slot"] == 0
    reference, timings = _run(setup["plain"], request, setup["storage"])
    assert timings["fused_qkv"] == 0
    assert np.abs(image - reference).max() <= 1


@pytest.mark.parametrize("setup", ["qwen-image"], indirect=True)  # Z-Image's adapter has no cache
def test_a_cached_job_runs_fused_and_gives_the_unfused_models_cached_image(setup):
    # TaylorSeer at 6 steps: 3 full steps, then predicted ones; the cache wraps the blocks, the
    # processors inside them run fused.
    request = _request(setup["key"], steps=6, cache={"method": "taylorseer", "interval": 2})
    fused_calls = calls(_attentions(setup["fused"].pipeline.transformer)[-1].to_qkv)
    _run(setup["fused"], request.model_copy(update={"cache": None}), setup["storage"])
    uncached_calls = len(fused_calls)
    image, timings = _run(setup["fused"], request, setup["storage"])
    assert timings["fused_qkv"] == 1
    assert 0 < len(fused_calls) - uncached_calls < uncached_calls  # predicted steps skip the block
    reference, _ = _run(setup["plain"], request, setup["storage"])
    assert np.abs(image - reference).max() <= 1


def test_a_lora_job_runs_the_parts_through_the_slot_and_the_base_comes_back(setup):
    adapter, storage = setup["fused"], setup["storage"]
    before, _ = _run(adapter, _request(setup["key"]), storage)
    attention = _attentions(adapter.pipeline.transformer)[0]
    fused_calls, part_calls = calls(attention.to_qkv), calls(attention.to_q)
    styled, timings = _run(adapter, setup["styled"], storage)
    assert part_calls and not fused_calls
    assert timings["fused_qkv"] == 0 and timings["lora_slot"] == 1
    reference, _ = _run(setup["plain"], setup["styled"], storage)
    assert np.abs(styled - reference).max() <= 1 and np.abs(styled - before).max() > 10
    after, timings = _run(adapter, _request(setup["key"]), storage)
    assert np.array_equal(after, before) and timings["fused_qkv"] == 1


def test_traced_whole_both_states_are_warmed_and_no_job_compiles(setup, small_models_dir: Path, monkeypatch):
    """Dynamo with its eager backend (the graphs inductor would compile, without compiling them):
    ``fullgraph=True`` fails on any graph break in the processors; a base job (fused), a LoRA job
    (the parts through the slot) and a size never warmed then trace nothing new."""
    from diffusers import ModelMixin

    original = ModelMixin.compile_repeated_blocks

    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("mode", None)
        return original(self, *args, **(kwargs | {"backend": "eager"}))

    monkeypatch.setattr(ModelMixin, "compile_repeated_blocks", traced)
    key = setup["key"]
    spec, (adapter_class, _, _) = CATALOG[key], MODELS[key]
    adapter = adapter_class(spec, str(small_models_dir / key), RUNTIME)
    warm = [(64, 64, 0), (96, 128, 0)]
    settings = setup["settings"].model_copy(
        update={"compile_profile": "compile", "fused_qkv": "on", "warm_sizes": {key: warm}}
    )
    speed = prepare(adapter, spec, VramClass.GPU80, settings)
    assert speed.compiled and speed.fused and speed.warmed == warm
    storage = setup["storage"]
    base, timings = _run(adapter, _request(key), storage)
    assert timings["compiled_graphs"] == 0 and timings["fused_qkv"] == 1 and timings["compile_regional"] == 1
    reference, _ = _run(setup["plain"], _request(key), storage)
    assert np.abs(base - reference).max() <= 1
    _, timings = _run(adapter, setup["styled"], storage)
    assert timings["compiled_graphs"] == 0 and timings["lora_slot"] == 1 and timings["fused_qkv"] == 0
    _, timings = _run(adapter, _request(key, 128, 96), storage)  # never warmed
    assert timings["compiled_graphs"] == 0 and timings["fused_qkv"] == 1


def test_an_edit_model_fuses_its_attention_and_edits_as_unfused(small_models_dir: Path, tmp_path: Path):
    """Qwen-Image-Edit-2509 (the same transformer, input images' tokens beside the output's)."""
    from PIL import Image

    spec = CATALOG["qwen-image-edit-2509"]
    weights = str(small_models_dir / spec.key)
    settings = Settings(compile_profile="eager", lora_cache_dir=tmp_path / "lora-cache")
    plain = QwenImageEditPlusAdapter(spec, weights, RUNTIME)
    prepare(plain, spec, VramClass.GPU80, settings)
    fused = QwenImageEditPlusAdapter(spec, weights, RUNTIME)
    speed = prepare(fused, spec, VramClass.GPU80, settings.model_copy(update={"fused_qkv": "on"}))
    assert speed.fused == _attentions(fused.pipeline.transformer)
    request = _request(spec.key, kind="edit", images=[{"key": "uploads/_/a.png"}, {"key": "uploads/_/b.png"}])
    inputs = {
        "images": [Image.new("RGB", (64, 48), (200, 40, 40)), Image.new("RGB", (48, 64), (40, 40, 200))]
    }
    storage = LocalStorage(tmp_path / "objects")
    image, timings = _run(fused, request, storage, inputs)
    assert timings["fused_qkv"] == 1
    reference, _ = _run(plain, request, storage, inputs)
    assert np.abs(image - reference).max() <= 1

"""The adapter contract: every registered adapter declares its capabilities and agrees with the
catalog; an adapter missing a required member cannot be made; the speed profile applies only
what an adapter declares, on the real small Z-Image pipeline, and the pool reads what it was given."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from routing.catalog import CATALOG, footprint_gb, get_model
from routing.classes import VramClass
from routing.io.storage import LocalStorage
from routing.schemas import parse_request
from routing.settings import Settings
from worker.adapters import ADAPTERS, GROUP_ADAPTER
from worker.adapters.base import Adapter, Capabilities, Generated, Images, Inputs, Runtime, StepCallback
from worker.adapters.z_image import ZImageAdapter
from worker.pool import PipelinePool
from worker.speed import job_context, prepare

RUNTIME = Runtime(device="cpu", dtype=torch.float32)
ZIMAGE = CATALOG["z-image-turbo"]


def _adapter_class(target: str) -> type[Adapter]:
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


@pytest.mark.parametrize("model", sorted(ADAPTERS))
def test_every_registered_adapter_declares_its_capabilities(model: str) -> None:
    cls = _adapter_class(ADAPTERS[model])
    assert issubclass(cls, Adapter) and not inspect.isabstract(cls)
    assert isinstance(cls.capabilities, Capabilities)


@pytest.mark.parametrize("model", sorted(ADAPTERS))
def test_an_adapter_takes_the_loras_and_step_caches_its_models_catalog_entry_offers(model: str) -> None:
    # The API accepts LoRAs and caches by the catalog; the adapter serving the model must run them.
    can = _adapter_class(ADAPTERS[model]).capabilities
    spec = CATALOG[model]
    assert can.loras == (spec.lora_modules is not None)
    assert can.step_cache == bool(spec.cache_methods)
    assert not can.warm_up or can.compile  # warming is for compiling


def test_the_group_adapter_runs_base_jobs_only() -> None:
    assert _adapter_class(GROUP_ADAPTER).capabilities == Capabilities()


def test_an_adapter_without_run_cannot_be_made() -> None:
    class NoRun(Adapter):
        capabilities = Capabilities()

    with pytest.raises(TypeError, match="abstract.*run"):
        NoRun(ZIMAGE, "", RUNTIME)


def test_an_adapter_without_capabilities_cannot_be_made() -> None:
    class Undeclared(Adapter):
        def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Generated:
            return Images([])

    with pytest.raises(TypeError, match="abstract.*capabilities"):
        Undeclared(ZIMAGE, "", RUNTIME)


class BaseOnlyZImage(ZImageAdapter):
    """The real Z-Image pipeline behind an adapter that declares nothing beyond base jobs."""

    capabilities = Capabilities()


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    # Compilation asked for, at one warm size: only an adapter declaring it may compile or warm.
    values: dict[str, Any] = {
        "compile_profile": "compile",
        "warm_sizes": {ZIMAGE.key: [(64, 64, 0)]},
        "lora_cache_dir": tmp_path / "lora-cache",
        "lora_max_rank": 8,
    }
    return Settings(**values | overrides)


def test_the_speed_profile_applies_only_what_the_adapter_declares(small_models_dir: Path, tmp_path: Path):
    adapter = BaseOnlyZImage(ZIMAGE, str(small_models_dir / ZIMAGE.key), RUNTIME)
    speed = prepare(adapter, ZIMAGE, VramClass.GPU80, _settings(tmp_path))  # a class that compiles it

    assert adapter.speed is speed
    assert (speed.compiled, speed.attention, speed.slot, speed.warmed) == (False, "native", None, [])
    data = {"model": ZIMAGE.key, "prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 1}
    request = parse_request(data)
    with_lora = parse_request(data | {"loras": [{"source": "loras/style.safetensors"}]})
    storage = LocalStorage(tmp_path / "objects")
    with pytest.raises(ValueError, match="runs no LoRAs"):
        with job_context(adapter, with_lora, storage, {}):
            pass
    timings: dict[str, float] = {}
    with job_context(adapter, request, storage, timings):
        generated = adapter.run(request, {}, lambda step, total: None)
    assert isinstance(generated, Images) and generated.images[0].size == (64, 64)
    assert timings["compile_regional"] == 0 and timings["attention_native"] == 1


def test_an_adapter_declaring_loras_gets_a_lora_slot_that_the_pool_counts(
    small_models_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, compile_profile="eager")
    weights = str(small_models_dir / ZIMAGE.key)

    def load(spec: Any, placement: Any) -> Adapter:
        adapter = ZImageAdapter(spec, weights, RUNTIME)
        prepare(adapter, spec, VramClass.GPU16, settings)
        return adapter

    pool = PipelinePool(load, VramClass.GPU16)
    adapter = pool.get(ZIMAGE.key).adapter

    assert adapter.capabilities.loras
    assert adapter.speed is not None and adapter.speed.slot is not None and not adapter.speed.compiled
    assert adapter.speed.extra_bytes > 0
    # No CUDA here: the weights are routing.memory's for gpu16's placement, the slot on top.
    assert pool.weights_source == {ZIMAGE.key: "predicted"}
    assert pool.used_gb == pytest.approx(pool.weights_gib[ZIMAGE.key] + adapter.speed.extra_bytes / 2**30)


def test_evicting_an_adapter_that_holds_nothing_more_closes_it_quietly() -> None:
    # Adapter.close is a no-op unless an adapter has more to free (the group's ends the group).
    class Held(Adapter):
        capabilities = Capabilities()

        def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Generated:
            raise NotImplementedError

    qwen, z = (footprint_gb(get_model(key), VramClass.GPU80) for key in ("qwen-image", "z-image-turbo"))
    assert qwen is not None and z is not None
    evicted: list[str] = []
    pool = PipelinePool(
        lambda spec, placement: Held(spec, "", RUNTIME),
        VramClass.GPU80,
        budget_gb=qwen + z,
        on_change=lambda change, key: evicted.append(key) if change == "evict" else None,
    )
    pool.get("qwen-image")
    pool.get("z-image-turbo")  # fits beside it
    pool.get("qwen-image-edit")  # as big as qwen-image: that one goes
    assert evicted == ["qwen-image"] and pool.resident == ["z-image-turbo", "qwen-image-edit"]

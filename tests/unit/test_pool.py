"""The resident pipeline pool: load once, keep within the VRAM budget, evict least recently used."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from routing.catalog import ModelSpec, footprint_gb, get_model
from routing.classes import VramClass
from routing.memory import Mode, Placement
from worker.adapters.base import Adapter, Capabilities, Runtime
from worker.pool import PipelinePool


class FakeAdapter(Adapter):
    """Stands in for a loaded pipeline: the pool's logic needs only the spec, the speed profile
    it was given and ``close`` (which ends a group model's group)."""

    capabilities = Capabilities()

    def __init__(self, spec: ModelSpec, placement: Placement):
        super().__init__(spec, "", Runtime(device="cpu", dtype=None).placed(placement))
        self.placement = placement
        self.closed = False

    def run(self, request: Any, inputs: Any, on_step: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True


def footprint(key: str, vram_class: VramClass) -> float:
    """The predicted footprint the pool budgets for a model (routing.memory)."""
    found = footprint_gb(get_model(key), vram_class)
    assert found is not None
    return found


def make_pool(
    vram_class: VramClass, budget_gb: float | None = None
) -> tuple[PipelinePool, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    pool = PipelinePool(
        FakeAdapter,
        vram_class,
        budget_gb=budget_gb,
        on_change=lambda change, key: changes.append((change, key)),
    )
    return pool, changes


def test_a_resident_model_is_not_loaded_again():
    pool, changes = make_pool(VramClass.GPU16)
    first = pool.get("z-image-turbo")
    second = pool.get("z-image-turbo")
    assert first.loaded and not second.loaded
    assert first.adapter is second.adapter
    assert pool.loads == {"z-image-turbo": 1}
    assert changes == [("load", "z-image-turbo")]


def test_a_budget_for_the_small_model_and_one_big_one_evicts_the_least_recently_used():
    z, qwen = footprint("z-image-turbo", VramClass.GPU80), footprint("qwen-image", VramClass.GPU80)
    edit = footprint("qwen-image-edit", VramClass.GPU80)
    assert z + edit <= z + qwen < qwen + edit  # Z-Image beside either Qwen model, never both Qwen ones
    pool, changes = make_pool(VramClass.GPU80, budget_gb=z + qwen)
    for key in ["z-image-turbo", "qwen-image", "z-image-turbo", "qwen-image-edit", "qwen-image"]:
        pool.get(key)

    assert pool.loads == {"z-image-turbo": 1, "qwen-image": 2, "qwen-image-edit": 1}
    # The edit model pushes out qwen-image (least recently used); qwen-image back pushes out both.
    assert pool.evictions == {"qwen-image": 1, "z-image-turbo": 1, "qwen-image-edit": 1}
    assert pool.resident == ["qwen-image"]
    assert pool.used_gb == qwen <= pool.budget_gb
    assert [c for c in changes if c[0] == "evict"] == [
        ("evict", "qwen-image"),
        ("evict", "z-image-turbo"),
        ("evict", "qwen-image-edit"),
    ]


def test_placement_follows_the_workers_class():
    small, _ = make_pool(VramClass.GPU16)
    big, _ = make_pool(VramClass.GPU80)
    placed = small.get("wan2.2-ti2v-5b").adapter
    assert placed.placement == Placement(Mode.MODEL_OFFLOAD, vae_tiling=True)
    assert placed.runtime.offload and placed.runtime.vae_tiling
    assert small.used_gb == footprint("wan2.2-ti2v-5b", VramClass.GPU16) <= 16
    assert big.get("wan2.2-ti2v-5b").adapter.placement == Placement(Mode.RESIDENT)
    assert big.used_gb == footprint("wan2.2-ti2v-5b", VramClass.GPU80)


def test_a_model_too_big_for_the_class_is_refused_before_loading():
    pool, changes = make_pool(VramClass.GPU16)
    with pytest.raises(MemoryError, match="does not fit a gpu16 worker"):
        pool.get("qwen-image")
    assert changes == [] and pool.resident == []


def test_an_h100x8_worker_budgets_one_gpu_and_a_big_smaller_job_evicts_the_group():
    # The pool's models run on the worker's GPU, rank 0's, beside S2V's rank of the group.
    pool, changes = make_pool(VramClass.H100X8)
    assert pool.budget_gb == 80
    s2v, z = footprint("wan2.2-s2v-14b", VramClass.H100X8), footprint("z-image-turbo", VramClass.H100X8)
    ti2v = footprint("wan2.2-ti2v-5b", VramClass.H100X8)
    assert s2v + z <= 80 < s2v + z + ti2v and z + ti2v <= 80
    group = pool.get("wan2.2-s2v-14b").adapter
    assert group.placement == Placement(Mode.SHARDED)
    pool.get("z-image-turbo")  # fits beside it
    assert not group.closed and pool.resident == ["wan2.2-s2v-14b", "z-image-turbo"]

    pool.get("wan2.2-ti2v-5b")  # fits once the group (least recently used) is closed

    assert group.closed
    assert pool.resident == ["z-image-turbo", "wan2.2-ti2v-5b"] and pool.used_gb == z + ti2v
    assert ("evict", "wan2.2-s2v-14b") in changes


def test_lora_memory_counts_in_the_budget():
    # Z-Image and qwen-image fit a budget with 1 GiB to spare; with qwen-image's LoRA slot and
    # a loaded variant taking 2 GiB more they do not, so the least recently used goes.
    lora_bytes = {"z-image-turbo": 0, "qwen-image": 2 * 2**30}
    z, qwen = footprint("z-image-turbo", VramClass.GPU80), footprint("qwen-image", VramClass.GPU80)

    def load(spec: ModelSpec, placement: Placement) -> FakeAdapter:
        adapter = FakeAdapter(spec, placement)
        adapter.use_speed(SimpleNamespace(extra_bytes=lora_bytes[spec.key]))
        return adapter

    pool = PipelinePool(load, VramClass.GPU80, budget_gb=z + qwen + 1)
    pool.get("z-image-turbo")
    pool.get("qwen-image")
    assert pool.resident == ["qwen-image"] and pool.evictions == {"z-image-turbo": 1}
    assert pool.used_gb == qwen + 2

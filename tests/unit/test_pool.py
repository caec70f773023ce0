"""The resident pipeline pool: load once, keep within the VRAM budget, evict least recently used."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from routing.catalog import ModelSpec
from routing.classes import VramClass
from worker.adapters.base import Adapter, Capabilities, Runtime
from worker.pool import PipelinePool


class FakeAdapter(Adapter):
    """Stands in for a loaded pipeline: the pool's logic needs only the spec, the speed profile
    it was given and ``close`` (which ends a group model's group)."""

    capabilities = Capabilities()

    def __init__(self, spec: ModelSpec, offload: bool):
        super().__init__(spec, "", Runtime(device="cpu", dtype=None, offload=offload))
        self.offload = offload
        self.closed = False

    def run(self, request: Any, inputs: Any, on_step: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True


def make_pool(
    vram_class: VramClass, budget_gb: int | None = None
) -> tuple[PipelinePool, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    pool = PipelinePool(
        lambda spec, offload: FakeAdapter(spec, offload),
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


def test_budget_for_two_of_three_evicts_the_least_recently_used():
    # z-image 16 GB, qwen-image 45 GB, qwen-image-edit 60 GB: any two fit 110 GB, not all three.
    pool, changes = make_pool(VramClass.GPU80, budget_gb=110)
    for key in ["z-image-turbo", "qwen-image", "z-image-turbo", "qwen-image-edit", "qwen-image"]:
        pool.get(key)

    assert pool.loads == {"z-image-turbo": 1, "qwen-image": 2, "qwen-image-edit": 1}
    assert pool.evictions == {"qwen-image": 1, "z-image-turbo": 1}
    assert pool.resident == ["qwen-image-edit", "qwen-image"]
    assert pool.used_gb == 105 <= pool.budget_gb
    assert [c for c in changes if c[0] == "evict"] == [("evict", "qwen-image"), ("evict", "z-image-turbo")]


def test_offload_profile_follows_the_workers_class():
    small, _ = make_pool(VramClass.GPU16)
    big, _ = make_pool(VramClass.GPU80)
    assert small.get("wan2.2-ti2v-5b").adapter.offload is True
    assert small.used_gb == 16
    assert big.get("wan2.2-ti2v-5b").adapter.offload is False
    assert big.used_gb == 24


def test_a_model_too_big_for_the_class_is_refused_before_loading():
    pool, changes = make_pool(VramClass.GPU16)
    with pytest.raises(MemoryError, match="does not fit a gpu16 worker"):
        pool.get("qwen-image")
    assert changes == [] and pool.resident == []


def test_an_h100x8_worker_budgets_one_gpu_and_a_big_smaller_job_evicts_the_group():
    # The pool's models run on the worker's GPU, rank 0's: S2V's rank takes 40 GB of its 80.
    pool, changes = make_pool(VramClass.H100X8)
    assert pool.budget_gb == 80
    group = pool.get("wan2.2-s2v-14b").adapter
    pool.get("z-image-turbo")  # 16 GB: fits beside it
    assert not group.closed and pool.resident == ["wan2.2-s2v-14b", "z-image-turbo"]

    pool.get("qwen-image-edit")  # 60 GB: fits once the group (least recently used) is closed

    assert group.closed
    assert pool.resident == ["z-image-turbo", "qwen-image-edit"] and pool.used_gb == 76
    assert ("evict", "wan2.2-s2v-14b") in changes


def test_lora_memory_counts_in_the_budget():
    # z-image 16 GB + qwen-image 45 GB fit a 62 GB budget; with qwen-image's LoRA slot and a
    # loaded variant taking 2 GiB more they do not, so the least recently used goes.
    lora_bytes = {"z-image-turbo": 0, "qwen-image": 2 * 2**30}

    def load(spec: ModelSpec, offload: bool) -> FakeAdapter:
        adapter = FakeAdapter(spec, offload)
        adapter.use_speed(SimpleNamespace(extra_bytes=lora_bytes[spec.key]))
        return adapter

    pool = PipelinePool(load, VramClass.GPU80, budget_gb=62)
    pool.get("z-image-turbo")
    pool.get("qwen-image")
    assert pool.resident == ["qwen-image"] and pool.evictions == {"z-image-turbo": 1}
    assert pool.used_gb == 47

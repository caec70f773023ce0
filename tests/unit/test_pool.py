"""The resident pipeline pool: load once, budget measured bytes of one GPU, make room for each
request's predicted peak by evicting the least recently used, refuse what cannot fit alone."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from routing.catalog import ModelSpec, get_model
from routing.classes import VramClass
from routing.memory import CARDS, Mode, Placement, Work, predict
from routing.memory.model import GIB
from routing.memory.model import weights_gib as predicted_weights_gib
from worker.adapters.base import Adapter, Capabilities, Runtime
from worker.pool import DoesNotFit, PipelinePool

SMALL = Work(64, 64)  # a request whose activations are next to nothing
BIG = Work(2048, 2048, guidance=True)  # Z-Image's and Qwen-Image's largest


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


class FakeGpu:
    """The one thing here that cannot be real: a CUDA device. Its free memory is given; what is
    allocated grows by the bytes of the parameters and buffers of real (small) torch modules
    the loader places on it."""

    def __init__(self, free_gib: float):
        self.free_gib = free_gib
        self.allocated = 0

    def free_bytes(self) -> int:
        return int(self.free_gib * GIB)

    def allocated_bytes(self) -> int:
        return self.allocated

    def place(self, module: torch.nn.Module) -> int:
        nbytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        self.allocated += nbytes
        return nbytes


def weights(key: str, vram_class: VramClass) -> float:
    """routing.memory's predicted weights of the model as the class places it (GiB)."""
    where = get_model(key).placements[vram_class]
    return predicted_weights_gib(key, where.mode, 8 if where.mode is Mode.SHARDED else 1)


def request_gib(key: str, vram_class: VramClass, work: Work) -> float:
    """What a request takes beyond the weights its model keeps on the GPU."""
    found = predict(get_model(key), vram_class, work)
    assert found is not None
    return found.peak_gib - weights(key, vram_class)


def make_pool(
    vram_class: VramClass, budget_gb: float | None = None, **kwargs: Any
) -> tuple[PipelinePool, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    pool = PipelinePool(
        FakeAdapter,
        vram_class,
        budget_gb=budget_gb,
        on_change=lambda change, key: changes.append((change, key)),
        **kwargs,
    )
    return pool, changes


def test_the_budget_is_the_cards_free_memory_at_start_less_the_margin():
    """Catches a budget taken from the class's nominal card (or without the margin) on a GPU."""
    on_gpu, _ = make_pool(VramClass.GPU16, gpu=FakeGpu(free_gib=21.5), margin_gib=2.0)
    assert (on_gpu.budget_gb, on_gpu.budget_source) == (19.5, "card free memory")
    # Without CUDA: the class's card, less the margin.
    no_gpu, _ = make_pool(VramClass.GPU80, margin_gib=3.0)
    assert (no_gpu.budget_gb, no_gpu.budget_source) == (CARDS[VramClass.GPU80].gib - 3.0, "class card")
    given, _ = make_pool(VramClass.GPU80, budget_gb=40, gpu=FakeGpu(free_gib=70))
    assert (given.budget_gb, given.budget_source) == (40, "given")


def test_weights_are_measured_after_the_load_on_a_gpu_and_predicted_without_one():
    """Catches weights taken from the prediction when the device measured them, a LoRA slot
    counted twice (in the measure and again as the slot), or a sharded model (whose weights the
    group's processes hold) measured in this process as nothing."""
    gpu = FakeGpu(free_gib=80)
    lora_bytes = 3 * 2**20
    placed: dict[str, int] = {}

    def load(spec: ModelSpec, placement: Placement) -> FakeAdapter:
        adapter = FakeAdapter(spec, placement)
        if placement.mode is not Mode.SHARDED:  # the group's ranks are other processes
            module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
            placed[spec.key] = gpu.place(module)
            gpu.allocated += lora_bytes  # the slot made while preparing the model
            adapter.use_speed(SimpleNamespace(extra_bytes=lora_bytes))  # type: ignore[arg-type]
        return adapter

    pool = PipelinePool(load, VramClass.H100X8, gpu=gpu, margin_gib=2.0)
    pool.get("z-image-turbo", SMALL)
    pool.get("wan2.2-s2v-14b", SMALL)

    # Linear weight and bias, float32; the norm's weight, bias, running mean and variance, and
    # its int64 batch count.
    assert placed["z-image-turbo"] == (64 * 64 + 64) * 4 + 4 * 64 * 4 + 8
    assert pool.weights_gib["z-image-turbo"] == placed["z-image-turbo"] / GIB
    assert pool.weights_source == {"z-image-turbo": "measured", "wan2.2-s2v-14b": "predicted"}
    assert pool.weights_gib["wan2.2-s2v-14b"] == weights("wan2.2-s2v-14b", VramClass.H100X8) > 1
    assert pool.used_gb == pytest.approx(
        (placed["z-image-turbo"] + lora_bytes) / GIB + weights("wan2.2-s2v-14b", VramClass.H100X8)
    )

    no_gpu, _ = make_pool(VramClass.GPU80)
    no_gpu.get("qwen-image")
    assert no_gpu.weights_source == {"qwen-image": "predicted"}
    assert no_gpu.weights_gib["qwen-image"] == weights("qwen-image", VramClass.GPU80) > 50


def test_a_resident_model_is_not_loaded_again():
    """Catches a pool that loads a model on every job."""
    pool, changes = make_pool(VramClass.GPU16)
    first = pool.get("z-image-turbo", SMALL)
    second = pool.get("z-image-turbo", SMALL)
    assert first.loaded and not second.loaded
    assert first.adapter is second.adapter
    assert pool.loads == {"z-image-turbo": 1}
    assert changes == [("load", "z-image-turbo")]


def test_a_request_whose_peak_does_not_fit_beside_the_resident_models_evicts_them_first():
    """Catches a pool that checks only the weights (a big request would then run out of memory
    beside a resident model) or that evicts the model the request runs on."""
    z, qwen = weights("z-image-turbo", VramClass.GPU80), weights("qwen-image", VramClass.GPU80)
    big = request_gib("qwen-image", VramClass.GPU80, BIG)
    small = request_gib("qwen-image", VramClass.GPU80, SMALL)
    budget = max(z + qwen + small, qwen + big) + 0.5
    assert budget < z + qwen + big
    pool, changes = make_pool(VramClass.GPU80, budget_gb=budget)
    pool.get("qwen-image", SMALL)
    pool.get("z-image-turbo", SMALL)  # both resident: a small request fits beside them
    pool.get("qwen-image", SMALL)
    assert pool.resident == ["z-image-turbo", "qwen-image"] and changes[-1] == ("load", "z-image-turbo")

    checkout = pool.get("qwen-image", BIG)

    assert not checkout.loaded
    assert pool.resident == ["qwen-image"] and changes[-1] == ("evict", "z-image-turbo")
    assert pool.used_gb + big <= pool.budget_gb


def test_a_request_that_cannot_fit_alone_is_refused_naming_the_limit_and_evicts_nothing():
    """Catches a job let run into an out-of-memory error by arithmetic, a refusal that throws
    out the resident models for a job that goes elsewhere, or a model loaded for nothing."""
    pool, changes = make_pool(VramClass.GPU80, margin_gib=10.0)
    pool.get("z-image-turbo", SMALL)
    big = request_gib("qwen-image", VramClass.GPU80, BIG)
    assert weights("qwen-image", VramClass.GPU80) + big > pool.budget_gb == 70

    with pytest.raises(DoesNotFit, match=r"qwen-image at 2048x2048 needs a predicted .* 70\.00 GiB budget"):
        pool.get("qwen-image", BIG)

    assert pool.resident == ["z-image-turbo"] and changes == [("load", "z-image-turbo")]
    with pytest.raises(MemoryError, match="does not run on a gpu16 worker"):  # the runner escalates
        make_pool(VramClass.GPU16)[0].get("qwen-image", SMALL)


def test_the_least_recently_used_model_is_evicted_first():
    """Catches eviction in load order (or most recently used first) instead of by last use."""
    z, qwen = weights("z-image-turbo", VramClass.GPU80), weights("qwen-image", VramClass.GPU80)
    edit = weights("qwen-image-edit", VramClass.GPU80)
    budget = z + qwen + 2  # and room for a small request's activations
    assert z + edit <= budget < qwen + edit  # Z-Image beside either Qwen model, never both Qwen ones
    pool, changes = make_pool(VramClass.GPU80, budget_gb=budget)
    for key in ["z-image-turbo", "qwen-image", "z-image-turbo", "qwen-image-edit", "qwen-image"]:
        pool.get(key, SMALL)

    assert pool.loads == {"z-image-turbo": 1, "qwen-image": 2, "qwen-image-edit": 1}
    # The edit model pushes out qwen-image (least recently used); qwen-image back pushes out both.
    assert [c for c in changes if c[0] == "evict"] == [
        ("evict", "qwen-image"),
        ("evict", "z-image-turbo"),
        ("evict", "qwen-image-edit"),
    ]
    assert pool.resident == ["qwen-image"] and pool.used_gb == qwen


def test_placement_follows_the_workers_class():
    """Catches a model placed the same way on every class (offloaded weights count nothing)."""
    small, _ = make_pool(VramClass.GPU16)
    big, _ = make_pool(VramClass.GPU80)
    placed = small.get("wan2.2-ti2v-5b", SMALL).adapter
    assert placed.placement == Placement(Mode.MODEL_OFFLOAD, vae_tiling=True)
    assert placed.runtime.offload and placed.runtime.vae_tiling
    assert small.used_gb == 0.0  # model offload keeps the weights in host memory
    assert big.get("wan2.2-ti2v-5b", SMALL).adapter.placement == Placement(Mode.RESIDENT)
    assert big.used_gb == weights("wan2.2-ti2v-5b", VramClass.GPU80) > 20


def test_an_h100x8_worker_budgets_one_gpu_and_a_big_smaller_job_evicts_the_group():
    """Catches a group kept resident (never closed) when a smaller class's job needs its GPU."""
    # The pool's models run on the worker's GPU, rank 0's, beside S2V's rank of the group.
    s2v, z = weights("wan2.2-s2v-14b", VramClass.H100X8), weights("z-image-turbo", VramClass.H100X8)
    ti2v = weights("wan2.2-ti2v-5b", VramClass.H100X8)
    pool, changes = make_pool(VramClass.H100X8, budget_gb=z + ti2v + 2)
    assert s2v + z + 2 <= pool.budget_gb < s2v + z + ti2v
    group = pool.get("wan2.2-s2v-14b", SMALL).adapter
    assert group.placement == Placement(Mode.SHARDED)
    pool.get("z-image-turbo", SMALL)  # fits beside it
    assert not group.closed and pool.resident == ["wan2.2-s2v-14b", "z-image-turbo"]

    pool.get("wan2.2-ti2v-5b", SMALL)  # fits once the group (least recently used) is closed

    assert group.closed
    assert pool.resident == ["z-image-turbo", "wan2.2-ti2v-5b"] and pool.used_gb == z + ti2v
    assert ("evict", "wan2.2-s2v-14b") in changes


def test_the_group_counts_every_group_model_once_and_leaves_the_pool_whole():
    """Catches a group counted at only the model the pool loaded first (one torchrun loads every
    group model on every rank), counted once per group model, or one group model left resident
    after another's eviction closed the group they share."""
    group = ("wan2.2-s2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b")
    whole = sum(weights(key, VramClass.H100X8) for key in group)
    assert 40 < whole < 50  # an eighth of three 14B models (A14B's two experts each) and their T5s
    pool, changes = make_pool(VramClass.H100X8, group_models=group)
    first = pool.get("wan2.2-t2v-a14b", SMALL).adapter
    assert first.placement == Placement(Mode.SHARDED)
    assert pool.weights_gib["wan2.2-t2v-a14b"] == pytest.approx(whole)
    second = pool.get("wan2.2-s2v-14b", SMALL).adapter
    assert pool.weights_gib["wan2.2-s2v-14b"] == 0.0 and pool.used_gb == pytest.approx(whole)
    # A group job that would fit beside its own model's weights, not beside the whole group's, is
    # refused (evicting nothing): the budget counts what the ranks hold.
    long_clip = Work(1280, 720, 1197, guidance=True)
    need = request_gib("wan2.2-i2v-a14b", VramClass.H100X8, long_clip)
    assert weights("wan2.2-i2v-a14b", VramClass.H100X8) + need <= pool.budget_gb < whole + need
    with pytest.raises(DoesNotFit):
        pool.get("wan2.2-i2v-a14b", long_clip)
    assert pool.resident == ["wan2.2-t2v-a14b", "wan2.2-s2v-14b"]

    # Qwen-Image at 2048x2048 does not fit beside the group on rank 0's GPU: the group goes whole,
    # even though the model it evicts first (least recently used) is counted at nothing.
    pool.get("wan2.2-s2v-14b", SMALL)
    pool.get("qwen-image", BIG)

    assert first.closed and second.closed
    assert pool.resident == ["qwen-image"]
    assert ("evict", "wan2.2-t2v-a14b") in changes and ("evict", "wan2.2-s2v-14b") in changes


def test_a_group_models_job_with_loras_runs_placed_as_the_class_below_places_it():
    """Catches a job with LoRAs or a variant handed to the group, which cannot apply them: an
    h100x8 worker takes smaller classes' jobs when idle, and gpu80 routes such A14B jobs."""
    group = ("wan2.2-s2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b")
    pool, _ = make_pool(VramClass.H100X8, group_models=group)
    in_group = pool.get("wan2.2-t2v-a14b", SMALL).adapter
    assert in_group.placement == Placement(Mode.SHARDED)

    clip = Work(1280, 720, 81, guidance=True, loras=True)
    own = pool.get("wan2.2-t2v-a14b", clip).adapter

    assert own.placement == Placement(Mode.EXPERT_OFFLOAD) and own.runtime.expert_offload
    assert pool.weights_gib["wan2.2-t2v-a14b@expert-offload"] == weights("wan2.2-t2v-a14b", VramClass.GPU80)
    # One expert and a 720p clip's activations (50.5 GiB predicted) do not fit beside the whole
    # group (43.4 GiB) on rank 0's GPU: the group went.
    assert in_group.closed and pool.resident == ["wan2.2-t2v-a14b@expert-offload"]
    # The next LoRA job finds it resident; a base job brings the group back beside it.
    assert pool.get("wan2.2-t2v-a14b", Work(832, 480, 81, loras=True)).adapter is own
    assert pool.get("wan2.2-t2v-a14b", SMALL).adapter.placement == Placement(Mode.SHARDED)
    assert pool.resident == ["wan2.2-t2v-a14b@expert-offload", "wan2.2-t2v-a14b"]


def test_lora_memory_counts_in_the_budget():
    """Catches a LoRA slot (and its loaded variants) left out of the budget."""
    # Z-Image and qwen-image fit a budget with 1 GiB to spare; with qwen-image's LoRA slot and
    # a loaded variant taking 2 GiB more they do not, so the least recently used goes.
    lora_bytes = {"z-image-turbo": 0, "qwen-image": 2 * 2**30}
    z, qwen = weights("z-image-turbo", VramClass.GPU80), weights("qwen-image", VramClass.GPU80)

    def load(spec: ModelSpec, placement: Placement) -> FakeAdapter:
        adapter = FakeAdapter(spec, placement)
        adapter.use_speed(SimpleNamespace(extra_bytes=lora_bytes[spec.key]))  # type: ignore[arg-type]
        return adapter

    pool = PipelinePool(load, VramClass.GPU80, budget_gb=z + qwen + 1)
    pool.get("z-image-turbo")
    pool.get("qwen-image")
    assert pool.resident == ["qwen-image"] and pool.evictions == {"z-image-turbo": 1}
    assert pool.used_gb == qwen + 2


def test_a_checkpoint_variants_first_job_gets_room_for_its_transformer_and_the_next_counts_it_held():
    """Catches FastWan's first job admitted as if its transformer (9.3 GiB beside the model's)
    took nothing: it would run out of memory loading it beside the other resident models."""
    ti2v, z = weights("wan2.2-ti2v-5b", VramClass.GPU80), weights("z-image-turbo", VramClass.GPU80)
    checkpoint = 10000624000 / GIB  # routing/memory/weights.json: TI2V-5B's transformer in bf16
    loaded: dict[str, Any] = {}

    def load(spec: ModelSpec, placement: Placement) -> FakeAdapter:
        adapter = FakeAdapter(spec, placement)
        speed = SimpleNamespace(extra_bytes=0, checkpoints={})
        adapter.use_speed(speed)  # type: ignore[arg-type]
        loaded[spec.key] = speed
        return adapter

    fast = Work(64, 64, frames=5, loras=True, variant="fastwan-3")
    need = request_gib("wan2.2-ti2v-5b", VramClass.GPU80, fast)
    pool = PipelinePool(load, VramClass.GPU80, budget_gb=ti2v + z + need + checkpoint - 0.5)
    pool.get("z-image-turbo")
    pool.get("wan2.2-ti2v-5b", Work(64, 64, frames=5))  # a base job: room for both models
    assert pool.resident == ["z-image-turbo", "wan2.2-ti2v-5b"]

    pool.get("wan2.2-ti2v-5b", fast)  # the variant's first job: Z-Image makes way for its transformer
    assert pool.resident == ["wan2.2-ti2v-5b"] and pool.evictions == {"z-image-turbo": 1}

    # Loaded by that job: counted in the model's held memory from then on, not asked for again.
    loaded["wan2.2-ti2v-5b"].checkpoints["fastwan-3"] = object()
    loaded["wan2.2-ti2v-5b"].extra_bytes = int(checkpoint * GIB)
    assert pool.used_gb == pytest.approx(ti2v + checkpoint)
    pool.get("wan2.2-ti2v-5b", fast)
    assert pool.resident == ["wan2.2-ti2v-5b"]


def _warm_work(vram_class: VramClass, **settings: Any) -> Any:
    """The worker's ``warm_work``: the warm-up jobs ``worker.speed.prepare`` runs at load."""
    from routing.settings import Settings
    from worker.speed import warm_works

    compiled = Settings(compile_profile="compile", **settings)
    return lambda spec: warm_works(spec, vram_class, compiled, "cuda:0")


def test_a_load_makes_room_for_its_warm_up_not_only_for_the_smaller_job_that_loads_it():
    """Catches a warm-up at the class's sizes run out of memory beside a resident model: the job
    that loads TI2V-5B is small, its warm-up is 1280x704 at 121 frames."""
    qwen, ti2v = weights("qwen-image", VramClass.GPU80), weights("wan2.2-ti2v-5b", VramClass.GPU80)
    small = request_gib("wan2.2-ti2v-5b", VramClass.GPU80, Work(832, 480, 41))
    warm = request_gib("wan2.2-ti2v-5b", VramClass.GPU80, Work(1280, 704, 121))
    budget = qwen + ti2v + small + request_gib("qwen-image", VramClass.GPU80, SMALL) + 0.1
    assert qwen + ti2v + warm > budget  # the warm-up does not fit beside Qwen-Image

    for warm_work, resident in (
        (None, ["qwen-image", "wan2.2-ti2v-5b"]),
        (_warm_work(VramClass.GPU80), ["wan2.2-ti2v-5b"]),
    ):
        pool, changes = make_pool(VramClass.GPU80, budget_gb=budget, warm_work=warm_work)
        pool.get("qwen-image", SMALL)
        pool.get("wan2.2-ti2v-5b", Work(832, 480, 41))
        assert pool.resident == resident
    assert changes[-2:] == [("evict", "qwen-image"), ("load", "wan2.2-ti2v-5b")]


def test_a_warm_up_that_the_budget_cannot_hold_leaves_room_for_the_job_and_says_so(caplog: Any):
    ti2v = weights("wan2.2-ti2v-5b", VramClass.GPU80)
    small = request_gib("wan2.2-ti2v-5b", VramClass.GPU80, Work(832, 480, 41))
    pool, _ = make_pool(VramClass.GPU80, budget_gb=ti2v + small + 0.1, warm_work=_warm_work(VramClass.GPU80))
    with caplog.at_level("WARNING", logger="worker.pool"):
        assert pool.get("wan2.2-ti2v-5b", Work(832, 480, 41)).loaded
    assert (
        "wan2.2-ti2v-5b: its warm-up needs a predicted" in caplog.text and "FLEET_WARM_SIZES" in caplog.text
    )


def test_every_warm_up_fits_its_class_alone_and_an_eager_one_asks_for_nothing():
    """The catalog's warm sizes are jobs of the class: each fits its card beside the model alone."""
    from routing.catalog import CATALOG
    from routing.memory import budget_gib
    from routing.settings import Settings
    from worker.speed import warm_works

    checked = 0
    for spec in CATALOG.values():
        for vram_class in spec.speed:
            works = _warm_work(vram_class)(spec)
            where = spec.placements.get(vram_class) if spec.placements else None
            if not works or where is None:
                continue
            for work in works:
                found = predict(spec, vram_class, work)
                assert found is not None and found.peak_gib <= budget_gib(vram_class, None), (spec.key, work)
                checked += 1
    assert checked >= 10
    animate = warm_works(
        get_model("wan2.2-animate-14b"), VramClass.GPU80, Settings(compile_profile="compile"), "cuda"
    )
    assert [(w.width, w.height, w.frames) for w in animate] == [(1280, 720, 77), (720, 1280, 41)]
    # Eager (the CPU's auto, or FLEET_COMPILE_PROFILE=eager): nothing is warmed.
    assert warm_works(get_model("wan2.2-ti2v-5b"), VramClass.GPU80, Settings(), "cpu") == []
    assert _warm_work(VramClass.GPU80, adapters={"z-image-turbo": "x:Y"})(get_model("z-image-turbo")) == []

"""The resident pipeline pool: each model is loaded once per worker process and kept.

The pool budgets bytes of one GPU. The budget is the card's free memory when the worker
starts, less the margin (``FLEET_VRAM_MARGIN_GIB``); on a machine without CUDA, the class's card
(``routing.memory.CARDS``) less the margin. Each model is counted at its resident weights:
measured on CUDA (the allocator's bytes before and after the load), else routing.memory's
predicted weights for its placement (a small model's host bytes say nothing about the card it is
counted against); ``weights_source`` says which. Before a job runs, its predicted peak beyond
the weights its model keeps (routing.memory, the class's placement) must fit beside the resident
models: the least recently used others are evicted until it does, and a job that does not fit
even alone raises ``DoesNotFit`` (a ``MemoryError``), which the runner turns into a hand-off to
the next bigger class. A model compiled at load is warmed there on jobs of the class's common
sizes (worker/speed.py), which may be bigger than the job that loads it: the load makes room for
the biggest of them too (``warm_work``), or the warm-up would run out of memory beside the resident
models. Loads and evictions are counted so tests and benchmarks can tell a warm
job from a cold one.

On an h100x8 worker the GPU is also rank 0's, so the group's models count in the same budget
(at their predicted weights per rank: the group's processes hold them, not this one). One
torchrun loads every group model (``group_models``), so the first of them the pool loads counts
the whole group's weights and the others nothing while it is resident; a smaller class's job that
does not fit beside them evicts the group: its ``close`` (``Adapter.close``, a no-op for most
adapters) ends the group, which frees every rank's GPU, so every group model leaves the pool
with it, and the next group job starts a new one. The group applies no LoRAs: a job of a group
model that carries LoRAs or a variant (a smaller class's job the idle worker took) runs the model
placed as the biggest smaller class that applies them places it (A14B: gpu80's expert offload), on
this GPU, as a pool entry of its own (``<model>@<mode>``).
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from routing.catalog import ModelSpec, get_model
from routing.classes import VramClass
from routing.memory import (
    Mode,
    Placement,
    Work,
    applies_loras,
    budget_gib,
    classes_for,
    default_margin_gib,
    placement,
)
from routing.memory.model import GIB, has_data
from routing.memory.model import predict as predict_placed
from routing.memory.model import weights as memory_weights
from routing.memory.model import weights_gib as predicted_weights_gib
from worker.adapters.base import Adapter, placing_seconds

log = logging.getLogger(__name__)

# Placements that keep the model's transformer on the GPU between jobs (so a checkpoint variant's
# is kept there too); the offloaded ones keep both in host memory.
_TRANSFORMER_ON_GPU = (Mode.RESIDENT, Mode.FP8, Mode.TEXT_ENCODER_OFFLOAD)

# Loads a model placed as the worker's class places it (routing.memory.Placement).
Loader = Callable[[ModelSpec, Placement], Adapter]


class DoesNotFit(MemoryError):
    """A job whose predicted peak does not fit this worker's budget even with no other model
    resident: a ``MemoryError``, so the runner hands it to the next bigger class."""


class DeviceMemory(Protocol):
    """The worker's GPU as the pool reads it."""

    def free_bytes(self) -> int: ...

    def allocated_bytes(self) -> int: ...


class CudaMemory:
    """A CUDA device's memory, read through torch's allocator."""

    def __init__(self, device: str):
        self.device = device

    @classmethod
    def of(cls, device: str) -> CudaMemory | None:
        """The device's memory, or None where ``device`` is not a CUDA device this machine has."""
        if not device.startswith("cuda"):
            return None
        import torch

        return cls(device) if torch.cuda.is_available() else None

    def free_bytes(self) -> int:
        import torch

        return torch.cuda.mem_get_info(self.device)[0]

    def allocated_bytes(self) -> int:
        import torch

        return torch.cuda.memory_allocated(self.device)


@dataclass(frozen=True)
class Checkout:
    adapter: Adapter
    loaded: bool  # this call loaded the model (a cold start)
    load_s: float
    to_device_s: float = 0.0  # of load_s, moving the weights to the device; the rest read them


class PipelinePool:
    def __init__(
        self,
        loader: Loader,
        vram_class: VramClass,
        budget_gb: float | None = None,
        on_change: Callable[[str, str], None] | None = None,
        *,
        gpu: DeviceMemory | None = None,
        margin_gib: float | None = None,
        group_models: Sequence[str] = (),
        warm_work: Callable[[ModelSpec], Sequence[Work]] | None = None,
    ):
        """``budget_gb``: the budget as given (tests, ``FLEET_VRAM_BUDGET_GB``), else measured on
        ``gpu`` (None: no CUDA here, the class's card). ``margin_gib``: kept free on the card
        (None: the settings'). ``group_models``: the models this worker's torchrun group serves
        (``settings.group_models`` on an h100x8 worker), which it loads all together.
        ``warm_work``: the shapes of the jobs the loader warms a model on (worker.speed.warm_works),
        each of which must fit beside the weights while it loads."""
        self._loader = loader
        self._warm_work = warm_work
        self.vram_class = vram_class
        self._gpu = gpu
        self.group_models = tuple(group_models)
        if budget_gb is not None:
            self.budget_gb, self.budget_source = float(budget_gb), "given"
        elif gpu is not None:
            free_gib = gpu.free_bytes() / GIB
            self.budget_gb = free_gib - (default_margin_gib() if margin_gib is None else margin_gib)
            self.budget_source = "card free memory"
            log.info(
                "budget %.2f GiB: the card's %.2f GiB free at start less the margin", self.budget_gb, free_gib
            )
        else:
            self.budget_gb, self.budget_source = budget_gib(vram_class, margin_gib), "class card"
            log.info(
                "no CUDA device: budget %.2f GiB, the %s class's card less the margin (nothing measured)",
                self.budget_gb,
                vram_class.value,
            )
        self._on_change = on_change  # called with ("load" | "evict", model key)
        self._resident: OrderedDict[str, Adapter] = OrderedDict()
        # Each resident model's weights on the GPU (GiB, without its LoRA slot), and whether
        # they were "measured" after its load or are routing.memory's "predicted" ones.
        self.weights_gib: dict[str, float] = {}
        self.weights_source: dict[str, str] = {}
        self.loads: dict[str, int] = {}
        # The last load of each model: (seconds in all, of which moving to the device).
        self.load_seconds: dict[str, tuple[float, float]] = {}
        self.evictions: dict[str, int] = {}

    @property
    def resident(self) -> list[str]:
        """Resident models, least recently used first."""
        return list(self._resident)

    @property
    def used_gb(self) -> float:
        """The resident models' weights, plus what their LoRA slots and loaded variants take
        (measured on the loaded transformer, so it grows when a variant loads)."""
        return sum(self._held_gib(key) for key in self._resident)

    def get(self, model_key: str, work: Work | None = None) -> Checkout:
        """The model, loaded if it is not resident, with room made for ``work`` (a request's
        shape, routing.memory.work_of; None: loading only, as at start) beside it."""
        spec = get_model(model_key)
        where = placement(spec, self.vram_class)
        if where is None or not has_data(spec.key):
            raise DoesNotFit(f"{model_key} does not run on a {self.vram_class.value} worker")
        if work is not None and work.loras and not applies_loras(where):
            # The class's own placement (the group) cannot apply the job's LoRAs or variant:
            # the model is placed as the biggest smaller class that can places it, on this GPU,
            # resident beside the other under a key of its own.
            smaller = [c for c in classes_for(spec, work) if c.rank < self.vram_class.rank]
            if not smaller:
                raise DoesNotFit(
                    f"{model_key} with LoRAs or a variant does not run on a {self.vram_class.value} worker"
                )
            where = placement(spec, smaller[-1])
            assert where is not None
            model_key = f"{model_key}@{where.mode.value}"
        need_gib = self._request_gib(spec, where, work) + self._checkpoint_gib(model_key, spec, where, work)
        if model_key in self._resident:
            self._resident.move_to_end(model_key)
            self._admit(model_key, self._held_gib(model_key), need_gib, work)
            return Checkout(self._resident[model_key], loaded=False, load_s=0.0)
        # Room for the weights as predicted and for the warm-up's jobs, before loading; then again
        # as measured, for the job.
        own_gib = self._loaded_gib(model_key, spec, where)
        warm_gib = max(
            (self._request_gib(spec, where, w) for w in self._warm_works(spec, model_key)), default=0.0
        )
        if own_gib + warm_gib > self.budget_gb >= own_gib + need_gib:
            log.warning(
                "%s: its warm-up needs a predicted %.2f GiB beside its %.2f GiB of weights, more than this "
                "worker's %.2f GiB budget: room is made for the job's %.2f GiB only (FLEET_WARM_SIZES)",
                model_key,
                warm_gib,
                own_gib,
                self.budget_gb,
                need_gib,
            )
            warm_gib = 0.0
        self._admit(model_key, own_gib, max(need_gib, warm_gib), work)
        started, placed = time.perf_counter(), placing_seconds()
        allocated = self._gpu.allocated_bytes() if self._gpu is not None else 0
        adapter = self._loader(spec, where)
        load_s = time.perf_counter() - started
        to_device_s = placing_seconds() - placed
        self._record_weights(model_key, spec, where, adapter, allocated)
        self.load_seconds[model_key] = (load_s, to_device_s)
        self._resident[model_key] = adapter
        self.loads[model_key] = self.loads.get(model_key, 0) + 1
        if self._on_change is not None:
            self._on_change("load", model_key)
        log.info(
            "loaded %s in %.2f s, %.2f GiB of weights (%s; resident: %s)",
            model_key,
            load_s,
            self.weights_gib[model_key],
            self.weights_source[model_key],
            ", ".join(self._resident),
        )
        self._admit(model_key, self._held_gib(model_key), need_gib, work)
        return Checkout(adapter, loaded=True, load_s=load_s, to_device_s=to_device_s)

    def _warm_works(self, spec: ModelSpec, key: str) -> Sequence[Work]:
        """The warm-up's jobs for ``spec`` loaded as this class places it (none for a model placed
        as a smaller class, ``<model>@<mode>``: that load is not warmed as this class's)."""
        if self._warm_work is None or key != spec.key:
            return ()
        return self._warm_work(spec)

    def _request_gib(self, spec: ModelSpec, where: Placement, work: Work | None) -> float:
        """What ``work`` takes on the GPU beyond the weights its model keeps there: its predicted
        peak less those weights (with model offload, the component it moves on as well)."""
        if work is None:
            return 0.0
        found = predict_placed(spec.key, where, work, self._ranks(where))
        return max(0.0, found.peak_gib - self._predicted_gib(spec, where))

    def _checkpoint_gib(self, key: str, spec: ModelSpec, where: Placement, work: Work | None) -> float:
        """Room for a checkpoint variant the job needs and the model has not loaded yet: a second
        transformer kept on the GPU beside the model's (in host memory where the placement keeps
        the model's there); once loaded it is counted in the model's own (``_held_gib``)."""
        variant = spec.variants.get(work.variant) if work is not None and work.variant else None
        if variant is None or variant.checkpoint is None or where.mode not in _TRANSFORMER_ON_GPU:
            return 0.0
        speed = getattr(self._resident.get(key), "speed", None)
        if speed is not None and variant.key in getattr(speed, "checkpoints", {}):
            return 0.0
        return memory_weights()[spec.key]["transformer"]["bytes"] / GIB

    def _ranks(self, where: Placement) -> int:
        """Sharded: a rank of the class's GPUs."""
        return self.vram_class.vram_gb // self.vram_class.gpu_vram_gb if where.mode is Mode.SHARDED else 1

    def _predicted_gib(self, spec: ModelSpec, where: Placement) -> float:
        return predicted_weights_gib(spec.key, where.mode, self._ranks(where))

    def _loaded_gib(self, key: str, spec: ModelSpec, where: Placement) -> float:
        """The predicted weights loading ``spec`` as ``key`` puts on the GPU: a group model's
        loads the whole group (every rank holds every group model), or nothing while the group is
        resident."""
        if key not in self.group_models:
            return self._predicted_gib(spec, where)
        if any(other in self.group_models for other in self._resident if other != key):
            return 0.0
        total = 0.0
        for key in self.group_models:
            member = get_model(key)
            member_where = placement(member, self.vram_class)
            if member_where is not None and has_data(key):
                total += self._predicted_gib(member, member_where)
        return total

    def _record_weights(
        self, key: str, spec: ModelSpec, where: Placement, adapter: Adapter, allocated: int
    ) -> None:
        """A loaded model's weights: measured on CUDA (the slot its LoRAs go in is counted apart,
        as it grows); predicted without CUDA, and for a sharded model, whose weights the group's
        processes hold."""
        if self._gpu is not None and where.mode is not Mode.SHARDED and key not in self.group_models:
            grown = self._gpu.allocated_bytes() - allocated
            self.weights_gib[key] = max(0.0, grown / GIB - _lora_gb(adapter))
            self.weights_source[key] = "measured"
        else:
            self.weights_gib[key] = self._loaded_gib(key, spec, where)
            self.weights_source[key] = "predicted"

    def _held_gib(self, key: str) -> float:
        return self.weights_gib[key] + _lora_gb(self._resident[key])

    def _admit(self, key: str, own_gib: float, need_gib: float, work: Work | None) -> None:
        """Evict the least recently used other models until ``key`` at ``own_gib`` and the job's
        ``need_gib`` fit beside the rest; raise ``DoesNotFit``, evicting nothing, when they do
        not fit alone (the job goes to a bigger class; the resident models serve the next)."""
        # A group model comes with the rest of its group: one torchrun holds them all.
        mates = [k for k in self._resident if k != key and {k, key} <= set(self.group_models)]
        own_gib += sum(self._held_gib(k) for k in mates)
        if own_gib + need_gib > self.budget_gb:
            raise DoesNotFit(self._refusal(key, own_gib, need_gib, work))
        while True:
            others = [k for k in self._resident if k != key and k not in mates]
            if sum(self._held_gib(k) for k in others) + own_gib + need_gib <= self.budget_gb:
                return
            self._evict(others[0])

    def _refusal(self, key: str, own_gib: float, need_gib: float, work: Work | None) -> str:
        shape = "" if work is None else f" at {work.width}x{work.height}"
        shape += f", {work.frames} frames" if work is not None and work.frames else ""
        source = self.weights_source.get(key, "predicted")
        return (
            f"{key}{shape} needs a predicted {need_gib:.2f} GiB beside its {own_gib:.2f} GiB of weights "
            f"({source}): more than this {self.vram_class.value} worker's {self.budget_gb:.2f} GiB budget "
            f"({self.budget_source})"
        )

    def _evict(self, key: str) -> None:
        if key in self.group_models:
            # Closing one ends the group: every group model goes with it.
            for other in [k for k in self._resident if k in self.group_models and k != key]:
                self._evict_one(other)
        self._evict_one(key)

    def _evict_one(self, key: str) -> None:
        adapter = self._resident.pop(key)
        del self.weights_gib[key], self.weights_source[key]
        self.evictions[key] = self.evictions.get(key, 0) + 1
        try:
            adapter.close()
        except Exception:
            log.exception("closing %s on eviction", key)
        del adapter
        _release_memory()
        log.info("evicted %s", key)
        if self._on_change is not None:
            self._on_change("evict", key)


def _lora_gb(adapter: Adapter) -> float:
    return adapter.speed.extra_bytes / 2**30 if adapter.speed is not None else 0.0


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass

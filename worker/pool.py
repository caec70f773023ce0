"""The resident pipeline pool: each model is loaded once per worker process and kept.

Models stay loaded while they fit the worker's VRAM budget; loading one that does not fit
evicts the least recently used first. Loads and evictions are counted so tests and benchmarks
can tell a warm job from a cold one.

The budget is one GPU's memory: the pool's models all run on the worker process's GPU. On an
h100x8 worker that GPU is also rank 0's, so the group's models count in the same budget (each
at its footprint per rank), and a smaller class's job that does not fit beside them evicts the
group: its ``close`` (``Adapter.close``, a no-op for most adapters) ends the group, which frees
every rank's GPU, and the next group job starts a new one.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from routing.catalog import ModelSpec, footprint_gb, get_model
from routing.classes import VramClass
from routing.memory import Placement, placement
from worker.adapters.base import Adapter, placing_seconds

log = logging.getLogger(__name__)

# Loads a model placed as the worker's class places it (routing.memory.Placement).
Loader = Callable[[ModelSpec, Placement], Adapter]


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
        budget_gb: int | None = None,
        on_change: Callable[[str, str], None] | None = None,
    ):
        self._loader = loader
        self.vram_class = vram_class
        self.budget_gb = budget_gb if budget_gb is not None else vram_class.gpu_vram_gb
        self._on_change = on_change  # called with ("load" | "evict", model key)
        self._resident: OrderedDict[str, Adapter] = OrderedDict()
        # Each model's predicted peak at the largest request the class takes (routing.memory).
        self._footprint_gb: dict[str, float] = {}
        self.loads: dict[str, int] = {}
        # The last load of each model: (seconds in all, of which moving to the device).
        self.load_seconds: dict[str, tuple[float, float]] = {}
        self.evictions: dict[str, int] = {}

    @property
    def resident(self) -> list[str]:
        """Resident models, least recently used first."""
        return list(self._resident)

    def get(self, model_key: str) -> Checkout:
        if model_key in self._resident:
            self._resident.move_to_end(model_key)
            return Checkout(self._resident[model_key], loaded=False, load_s=0.0)
        spec = get_model(model_key)
        needed_gb = footprint_gb(spec, self.vram_class)
        where = placement(spec, self.vram_class)
        if needed_gb is None or where is None or needed_gb > self.budget_gb:
            raise MemoryError(
                f"{model_key} does not fit a {self.vram_class.value} worker ({self.budget_gb} GB budget)"
            )
        self._make_room(needed_gb)
        started, placed = time.perf_counter(), placing_seconds()
        adapter = self._loader(spec, where)
        load_s = time.perf_counter() - started
        to_device_s = placing_seconds() - placed
        self.load_seconds[model_key] = (load_s, to_device_s)
        self._resident[model_key] = adapter
        self._footprint_gb[model_key] = needed_gb
        self.loads[model_key] = self.loads.get(model_key, 0) + 1
        if self._on_change is not None:
            self._on_change("load", model_key)
        self._make_room(0.0, keep=model_key)  # its LoRA slot is measurable only now it is loaded
        log.info("loaded %s in %.2f s (resident: %s)", model_key, load_s, ", ".join(self._resident))
        return Checkout(adapter, loaded=True, load_s=load_s, to_device_s=to_device_s)

    @property
    def used_gb(self) -> float:
        """The predicted footprints of the resident models, plus what their LoRA slots and loaded
        variants take (measured on the loaded transformer, so it grows when a variant loads)."""
        return sum(self._footprint_gb[key] + _lora_gb(self._resident[key]) for key in self._resident)

    def _make_room(self, needed_gb: float, keep: str | None = None) -> None:
        while self._resident and self.used_gb + needed_gb > self.budget_gb:
            if keep is not None and next(iter(self._resident)) == keep:
                break
            key, adapter = self._resident.popitem(last=False)
            del self._footprint_gb[key]
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

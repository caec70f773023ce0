"""The speed profile of a resident model, and what a job adds to it: LoRAs and a variant.

At load, in this order (the LoRA slot must exist before compiling, or hotswapping into it would
recompile):

1. the request LoRA slot on the transformer (worker/loras.py), when the model takes LoRAs;
2. the attention backend: the first of the profile's list the device has (``native`` SDPA
   always; on the CPU only that);
3. regional compilation: ``compile_repeated_blocks`` compiles the transformer's one repeated block
   class once and reuses it for every block (tens of times faster to compile than the whole
   model, nearly as fast to run);
4. warm-up: one short job at each of the class's common sizes. The first size compiles the
   blocks for that shape; the second makes dynamo mark the changing sizes dynamic and compile a
   shape-general graph. After two sizes, a size not warmed runs without compiling again: the
   choice here is dynamic shapes after warm-up rather than one graph per size, which would make
   every new size pay a compile in some job.

The catalog holds the profile per model and class; settings turn it on or off (``auto``: on a
GPU only). What ran is logged at start-up and recorded in every job's timings (numbers only:
``compile_regional`` 1 or 0, ``attention_<backend>`` 1, ``compiled_graphs`` compiled during the job).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routing.catalog import ModelSpec, SpeedProfile, TaskKind
from routing.classes import VramClass
from routing.io.storage import Storage
from routing.settings import Settings
from worker.adapters.base import Adapter
from worker.loras import LoraCache, LoraSlot

log = logging.getLogger(__name__)


@dataclass
class Speed:
    """What one resident model runs with; the adapter is given it with ``Adapter.use_speed``."""

    model: str
    compiled: bool
    attention: str
    slot: LoraSlot | None = None
    cache: LoraCache | None = None
    settings: Settings | None = None
    warmed: list[tuple[int, int, int]] = field(default_factory=list)
    warm_s: float = 0.0
    # A two-expert model's second slot, on ``transformer_2`` (the low-noise expert); ``slot`` is
    # then the high-noise expert's.
    slot_2: LoraSlot | None = None

    @property
    def extra_bytes(self) -> int:
        """Memory beyond the catalog footprint: the LoRA slots and loaded variants."""
        return sum(slot.nbytes for slot in (self.slot, self.slot_2) if slot is not None)

    def timings(self) -> dict[str, float]:
        return {"compile_regional": float(self.compiled), f"attention_{self.attention}": 1.0}

    @contextmanager
    def for_job(self, request: Any, storage: Storage, timings: dict[str, float]) -> Iterator[None]:
        """Apply the request's variant and LoRAs for the job, and take the LoRAs off after it."""
        timings.update(self.timings())
        graphs_before = _compiled_graphs()
        loras = list(request.loras or [])
        if self.slot is None:
            if loras or request.variant:
                raise ValueError(f"{self.model} runs no LoRAs on this worker")
            yield
            return
        t0 = time.perf_counter()
        # Per slot, a variant's LoRA (kept on the device) takes the first rows, the request's the rest.
        slots = {"high": self.slot, "low": self.slot_2} if self.slot_2 is not None else {"both": self.slot}
        entries: dict[str, list[tuple[Any, float]]] = {expert: [] for expert in slots}
        if request.variant:
            loaded = self._variant(request.variant, timings)
            for expert, slot in slots.items():
                entries[expert].append(slot.variants[loaded])
        if loras:
            hits, misses = self.cache.hits, self.cache.misses
            for lora in loras:
                path = str(self.cache.path(lora.source, storage))
                for expert in slots:
                    if lora.expert in ("both", expert):
                        entries[expert].append((path, lora.scale))
            timings["lora_cache_hits"] = float(self.cache.hits - hits)
            timings["lora_cache_misses"] = float(self.cache.misses - misses)
        try:
            # Inside the try: a hotswap that fails part-way may have written some of the slot.
            for expert, slot in slots.items():
                if entries[expert]:
                    slot.apply(entries[expert])
            timings["lora_s"] = round(time.perf_counter() - t0, 4)
            yield
        finally:
            for expert, slot in slots.items():
                if entries[expert]:
                    slot.clear()
            timings["compiled_graphs"] = float(_compiled_graphs() - graphs_before)

    def _variant(self, name: str, timings: dict[str, float]) -> str:
        """Load variant ``name``'s LoRA into the slot once (a two-expert model: each expert's
        file into its own slot); returns the name the slots keep it under."""
        adapter_name = f"variant-{name}"
        if adapter_name not in self.slot.variants:
            from routing.catalog import get_model

            variant = get_model(self.model).variants[name]
            t0 = time.perf_counter()
            files = [(self.slot, variant.lora_file, f"{self.model}:{name}")]
            if self.slot_2 is not None:
                if variant.lora_file_2 is None:
                    raise ValueError(f"variant {name} of {self.model} has no LoRA for the low-noise expert")
                files.append((self.slot_2, variant.lora_file_2, f"{self.model}:{name}:low"))
            for slot, hub_file, setting in files:
                source = self.settings.variant_weights.get(setting) if self.settings else None
                if source is None:
                    from huggingface_hub import hf_hub_download

                    source = hf_hub_download(variant.lora_repo, hub_file)
                slot.add_variant(adapter_name, source, variant.lora_scale)
                log.info("%s: variant %s loaded into %s from %s", self.model, name, slot.component, source)
            timings["variant_load_s"] = round(time.perf_counter() - t0, 4)
        return adapter_name


def profile_for(spec: ModelSpec, vram_class: VramClass, settings: Settings, device: str) -> SpeedProfile:
    """The catalog's profile for this class, with compilation as the settings and device say."""
    profile = spec.speed.get(vram_class, SpeedProfile(compile=False))
    compile_on = {"compile": profile.compile, "eager": False, "auto": profile.compile and device != "cpu"}
    sizes = settings.warm_sizes.get(spec.key)
    return SpeedProfile(
        compile=compile_on[settings.compile_profile],
        warm_sizes=tuple(tuple(size) for size in sizes) if sizes is not None else profile.warm_sizes,
        attention=profile.attention,
    )


def prepare(adapter: Adapter, spec: ModelSpec, vram_class: VramClass, settings: Settings) -> Speed:
    """Give a freshly loaded adapter its speed profile (see the module docstring), each step as
    far as the adapter's capabilities go; returns what it runs with, also given to the adapter
    (``Adapter.use_speed``)."""
    can = adapter.capabilities
    pipe = adapter.pipeline
    device = adapter.runtime.device
    profile = profile_for(spec, vram_class, settings, device)
    # 1. The LoRA slot, before anything is compiled.
    slot = slot_2 = None
    # A two-expert model's second transformer takes everything the first does.
    second = getattr(pipe, "transformer_2", None) if pipe is not None else None
    if can.loras and spec.lora_modules is not None and settings.max_loras > 0:
        # Room for the request's LoRAs, and for a variant's where the model has variants.
        rank = settings.lora_max_rank + (settings.variant_lora_rank if spec.variants else 0)
        slot = LoraSlot(pipe, spec.lora_modules, rank)
        if second is not None:
            slot_2 = LoraSlot(pipe, spec.lora_modules, rank, component="transformer_2")
    transformer = pipe.transformer if can.compile else None
    # 2. Attention.
    attention = _set_attention(transformer, profile, settings.attention_backend, device)
    if transformer is not None and second is not None:
        _set_attention(second, profile, attention, device)
    # 3. Regional compilation of the transformer's repeated blocks.
    compiled = bool(profile.compile and transformer is not None)
    if compiled:
        transformer.compile_repeated_blocks(fullgraph=True)
        if second is not None:
            second.compile_repeated_blocks(fullgraph=True)
    speed = Speed(
        spec.key,
        compiled,
        attention,
        slot=slot,
        cache=LoraCache(Path(settings.lora_cache_dir), settings.lora_cache_bytes) if slot else None,
        settings=settings,
        slot_2=slot_2,
    )
    # 4. Warm-up at the class's common sizes, so no job pays a compile.
    if compiled and can.warm_up:
        t0 = time.perf_counter()
        for size in profile.warm_sizes:
            if _warm(adapter, spec, size):
                speed.warmed.append(size)
        speed.warm_s = time.perf_counter() - t0
    adapter.use_speed(speed)
    log.info(
        "%s: %s, attention %s, LoRA slot %s, warmed %s in %.1f s",
        spec.key,
        "regional compile" if compiled else "eager",
        attention,
        f"rank {slot.rank} ({speed.extra_bytes / 2**20:.1f} MiB{', two experts' if slot_2 else ''})"
        if slot
        else "none",
        ", ".join("x".join(str(n) for n in size if n) for size in speed.warmed) or "nothing",
        speed.warm_s,
    )
    return speed


def _set_attention(transformer: Any, profile: SpeedProfile, forced: str, device: str) -> str:
    if transformer is None:
        return "native"
    wanted = [forced] if forced != "auto" else list(profile.attention)
    for name in wanted:
        if name != "native" and not device.startswith("cuda") and forced == "auto":
            continue  # the fused kernels are CUDA's
        try:
            transformer.set_attention_backend(name)
            return name
        except Exception as exc:  # the kernel's package is not installed, or not for this GPU
            if forced != "auto":
                raise
            log.debug("attention backend %s unavailable: %s", name, exc)
    return "native"


def _warm(adapter: Adapter, spec: ModelSpec, size: tuple[int, int, int]) -> bool:
    """One two-step job at ``size``; False for kinds whose inputs cannot be made up here (an
    adapter declaring ``warm_up`` serves none of those)."""
    from PIL import Image

    from routing.schemas import parse_request

    width, height, frames = size
    kind = spec.task_kinds[0]
    data: dict[str, Any] = {"model": spec.key, "prompt": "warm-up", "width": width, "height": height}
    data |= {"steps": 2, "seed": 0, "kind": kind.value}
    inputs: dict[str, Any] = {}
    if kind is TaskKind.TEXT_TO_VIDEO:
        data["frames"] = frames or spec.video.default_frames
    elif kind is TaskKind.EDIT:
        data["images"] = [{"key": "warm-up.png"}]
        inputs["images"] = [Image.new("RGB", (width, height), (128, 128, 128))]
    elif kind is not TaskKind.TEXT_TO_IMAGE:
        return False  # animate's pose and face videos: not warmed yet, its first job compiles
    adapter.run(parse_request(data), inputs, lambda step, total: None)
    return True


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextmanager
def job_context(
    adapter: Adapter, request: Any, storage: Storage, timings: dict[str, float]
) -> Iterator[None]:
    """``adapter.speed.for_job``; an adapter without a speed profile (one of your own, which the
    worker does not prepare) runs base jobs only."""
    speed = adapter.speed
    if speed is not None:
        with speed.for_job(request, storage, timings):
            yield
        return
    if request.loras or request.variant:
        raise ValueError(f"{request.model} runs no LoRAs or variants on this worker")
    yield

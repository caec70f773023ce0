"""The speed profile of a resident model, and what a job adds to it: LoRAs and a variant.

At load, in this order (the LoRA slot must exist before compiling, or hotswapping into it would
recompile):

0. fused QKV projections (worker/fused.py), where the profile asks and the transformer has
   them (diffusers' Wan attention): one GEMM for query, key and value in base jobs, the three
   layers (views of the fused weights) in jobs through the LoRA slot, which wraps them;
1. the request LoRA slot on the transformer (worker/loras.py), when the model takes LoRAs. It is
   switched off (peft's adapters disabled, so each layer computes its base weights alone) for
   every job that names no LoRA and no variant, and on only for the jobs that do: a base job pays
   nothing for the slot, and is bit for bit the output of a transformer that never had one;
2. the attention backend: the first of the profile's list the device has (``native`` SDPA
   always; on the CPU only that);
3. FP8 linear layers (torchao: FP8 weights, activations scaled per row as they come), where the
   profile asks for them and the device has them (CUDA, compute capability 8.9 or more, torchao
   installed); otherwise bf16, with the reason logged;
4. regional compilation: ``compile_repeated_blocks`` compiles the transformer's one repeated block
   class once and reuses it for every block (tens of times faster to compile than the whole
   model, nearly as fast to run); with CUDA graphs (inductor's ``reduce-overhead``) where the
   profile asks for them and the device is CUDA; and where the profile asks, the text encoder's
   repeated layers the same way (each layer's ``compile``: one graph for them all);
5. warm-up: a short job at each of the class's common sizes, each with the slot off and on, and
   with prompts of two lengths. The first size compiles the blocks for that shape; the second,
   of other image and text token counts, makes dynamo mark those sizes dynamic and compile a
   shape-general graph. After that, a size or prompt length not warmed runs without compiling
   again: the choice here is dynamic shapes after warm-up rather than one graph per size, which
   would make every new size pay a compile in some job.

A job with a step cache runs the compiled blocks' eager code: diffusers' cache hooks decide per
step in Python whether a block runs, which a full-graph compiled block cannot trace.

A variant job: a LoRA variant's LoRA is copied into the slot (its first rows, the request's LoRAs
after it); a checkpoint variant's weights change places with the transformer's for the job
(worker/checkpoints.py). Either way the modules the warm-up compiled run it, compiling nothing.

The catalog holds the profile per model and class; settings turn it on or off (``auto``: on a
GPU only). What ran is logged at start-up and recorded in every job's timings (numbers only:
``compile_regional`` 1 or 0, ``attention_<backend>`` 1, ``lora_slot`` 1 when the job ran through
the slot, ``fp8_linear``, ``cuda_graphs`` and ``fused_qkv`` 1 or 0, ``compiled_graphs`` compiled
during the job).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routing.catalog import (
    VARIANT_SEPARATOR,
    ModelSpec,
    SpeedProfile,
    TaskKind,
    Variant,
    get_model,
    variant_spec,
)
from routing.classes import VramClass
from routing.memory import Work
from routing.settings import Settings, switched
from worker import fused as fused_qkv
from worker.adapters.base import Adapter
from worker.checkpoints import CheckpointVariant
from worker.loras import LoraCache, LoraSlot

if TYPE_CHECKING:
    # Only named here: importing the stores takes boto3, which a GPU bench machine may lack.
    from routing.io.storage import Storage

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
    fp8: bool = False  # the transformer's linear layers run FP8 GEMMs
    cuda_graphs: bool = False  # the compiled blocks replay CUDA graphs
    text_encoder_compiled: bool = False  # the text encoder's repeated layers are compiled too
    # Attention modules with fused QKV projections: run fused while the LoRA slot is off.
    fused: list[Any] = field(default_factory=list)
    # The compiled blocks (``compile_repeated_blocks``), switched to their eager code for a job
    # with a step cache.
    compiled_blocks: list[Any] = field(default_factory=list)
    # The transformer, and the checkpoint variants loaded for it (worker/checkpoints.py) by name.
    transformer: Any = None
    checkpoints: dict[str, CheckpointVariant] = field(default_factory=dict)

    # Where the model computes (``Runtime.device``).
    device: str = "cpu"

    @property
    def extra_bytes(self) -> int:
        """Memory beyond the catalog footprint: the LoRA slots and loaded variants (a checkpoint
        variant where it is kept on the model's device: an offloaded model keeps it in host
        memory, as it keeps its own transformer)."""
        on_device = [c for c in self.checkpoints.values() if c.device.type == self.device.split(":")[0]]
        return sum(slot.nbytes for slot in self.slots) + sum(c.nbytes for c in on_device)

    @property
    def slots(self) -> list[LoraSlot]:
        return [slot for slot in (self.slot, self.slot_2) if slot is not None]

    def timings(self) -> dict[str, float]:
        return {
            "compile_regional": float(self.compiled),
            f"attention_{self.attention}": 1.0,
            "lora_slot": 0.0,
            "fp8_linear": float(self.fp8),
            "cuda_graphs": float(self.cuda_graphs),
            "compile_text_encoder": float(self.text_encoder_compiled),
            "fused_qkv": float(bool(self.fused)),
        }

    def switch_slots(self, on: bool) -> None:
        """The LoRA slot on (the attention's own query, key and value layers, which it wraps) or
        off (the fused projections, where the model has them)."""
        for slot in self.slots:
            slot.switch(on)
        fused_qkv.switch(self.fused, not on)

    @contextmanager
    def for_job(self, request: Any, storage: Storage, timings: dict[str, float]) -> Iterator[None]:
        """Apply the request's variant and LoRAs for the job, and take the LoRAs off after it."""
        timings.update(self.timings())
        graphs_before = _compiled_graphs()
        loras = list(request.loras or [])
        variant = get_model(self.model).variants.get(request.variant) if request.variant else None
        # A LoRA variant goes into the slot; a checkpoint variant swaps the transformer's weights.
        lora_variant = variant is not None and variant.checkpoint is None
        if self.slot is None and (loras or lora_variant):
            raise ValueError(f"{self.model} runs no LoRAs on this worker")
        try:
            with self._eager_for_cache(request, timings), self._checkpoint_for_job(variant, storage, timings):
                if self.slot is None or (not loras and not lora_variant):
                    yield  # no slot, or the slot stays off: the base weights alone
                else:
                    with self._slot_for_job(request, loras, lora_variant, storage, timings):
                        yield
        finally:
            timings["compiled_graphs"] = float(_compiled_graphs() - graphs_before)

    @contextmanager
    def _checkpoint_for_job(
        self, variant: Variant | None, storage: Storage, timings: dict[str, float]
    ) -> Iterator[None]:
        """A checkpoint variant's weights in the transformer for the job (read once, then kept)."""
        if variant is None or variant.checkpoint is None:
            yield
            return
        if variant.key not in self.checkpoints:
            if self.transformer is None:
                raise ValueError(f"{self.model} runs no checkpoint variants on this worker")
            t0 = time.perf_counter()
            source = self._variant_source(variant, None, storage)
            self.checkpoints[variant.key] = CheckpointVariant(self.transformer, source)
            log.info("%s: variant %s loaded from %s", self.model, variant.key, source)
            timings["variant_load_s"] = round(time.perf_counter() - t0, 4)
        timings["variant_checkpoint"] = 1.0
        with self.checkpoints[variant.key].swapped_in():
            yield

    @contextmanager
    def _eager_for_cache(self, request: Any, timings: dict[str, float]) -> Iterator[None]:
        """A job with a step cache runs the compiled blocks' eager code (see the module docstring)."""
        if not self.compiled_blocks or getattr(request, "cache", None) is None:
            yield
            return
        saved = [block._compiled_call_impl for block in self.compiled_blocks]
        for block in self.compiled_blocks:
            block._compiled_call_impl = None
        timings["compile_regional"] = 0.0
        timings["cuda_graphs"] = 0.0
        try:
            yield
        finally:
            for block, compiled in zip(self.compiled_blocks, saved, strict=True):
                block._compiled_call_impl = compiled

    @contextmanager
    def _slot_for_job(
        self, request: Any, loras: list[Any], lora_variant: bool, storage: Storage, timings: dict[str, float]
    ) -> Iterator[None]:
        t0 = time.perf_counter()
        # Per slot, a variant's LoRA (kept on the device) takes the first rows, the request's the rest.
        slots = {"high": self.slot, "low": self.slot_2} if self.slot_2 is not None else {"both": self.slot}
        entries: dict[str, list[tuple[Any, float]]] = {expert: [] for expert in slots}
        if lora_variant:
            loaded = self._variant(request.variant, storage, timings)
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
            self.switch_slots(True)
            timings["lora_slot"] = 1.0
            timings["fused_qkv"] = 0.0
            timings["lora_s"] = round(time.perf_counter() - t0, 4)
            yield
        finally:
            self.switch_slots(False)
            for expert, slot in slots.items():
                if entries[expert]:
                    slot.clear()

    def _variant(self, name: str, storage: Storage, timings: dict[str, float]) -> str:
        """Load variant ``name``'s LoRA into the slot once (a two-expert model: each expert's
        file into its own slot); returns the name the slots keep it under."""
        adapter_name = f"variant-{name}"
        if adapter_name not in self.slot.variants:
            variant = get_model(self.model).variants[name]
            t0 = time.perf_counter()
            files = [(self.slot, variant.lora_file, "")]
            if self.slot_2 is not None:
                if variant.lora_file_2 is None:
                    raise ValueError(f"variant {name} of {self.model} has no LoRA for the low-noise expert")
                files.append((self.slot_2, variant.lora_file_2, ":low"))
            for slot, hub_file, suffix in files:
                source = self._variant_source(variant, hub_file, storage, suffix)
                slot.add_variant(adapter_name, source, variant.lora_scale)
                log.info("%s: variant %s loaded into %s from %s", self.model, name, slot.component, source)
            timings["variant_load_s"] = round(time.perf_counter() - t0, 4)
        return adapter_name

    def _variant_source(
        self, variant: Variant, hub_file: str | None, storage: Storage, suffix: str = ""
    ) -> str:
        """Where a variant's weights are read: its LoRA file (``hub_file``), or for a checkpoint
        variant its folder. In order: ``FLEET_VARIANT_WEIGHTS`` (key ``<model>:<variant>``, a
        two-expert model's low-noise file ``...:low``); the variant's own weights folder as a
        model's is found (``<model>:<variant>``: the node cache, filled from the store's mirror,
        ``FLEET_WEIGHTS``, ``FLEET_MODEL_ROOT``); else the hub, at its revision."""
        key = f"{self.model}{VARIANT_SEPARATOR}{variant.key}"
        given = self.settings.variant_weights.get(key + suffix) if self.settings else None
        if given is not None:
            return given  # before importing the stores (boto3), which a GPU bench machine may lack
        if self.settings is not None:
            from worker.weights import local_weights

            folder = Path(
                local_weights(self.settings, variant_spec(get_model(self.model), variant.key), storage)
            )
            wanted = folder / hub_file if hub_file else folder / "transformer"
            if wanted.exists():
                return str(wanted if hub_file else folder)
        if hub_file:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(variant.repo, hub_file, revision=variant.revision)
        from huggingface_hub import snapshot_download

        return snapshot_download(variant.repo, revision=variant.revision, allow_patterns=list(variant.files))


def profile_for(spec: ModelSpec, vram_class: VramClass, settings: Settings, device: str) -> SpeedProfile:
    """The catalog's profile for this class, with compilation, FP8 and CUDA graphs as the settings
    and device say (the device may still lack FP8 or CUDA graphs: ``prepare`` falls back)."""
    profile = spec.speed.get(vram_class, SpeedProfile(compile=False))
    compile_on = {"compile": profile.compile, "eager": False, "auto": profile.compile and device != "cpu"}
    sizes = settings.warm_sizes.get(spec.key)
    return SpeedProfile(
        compile=compile_on[settings.compile_profile],
        warm_sizes=tuple(tuple(size) for size in sizes) if sizes is not None else profile.warm_sizes,
        attention=profile.attention,
        fp8=switched(settings.fp8, profile.fp8),
        cuda_graphs=switched(settings.cuda_graphs, profile.cuda_graphs),
        compile_text_encoder=switched(settings.compile_text_encoder, profile.compile_text_encoder),
        fused_qkv=switched(settings.fused_qkv, profile.fused_qkv),
    )


def prepare(adapter: Adapter, spec: ModelSpec, vram_class: VramClass, settings: Settings) -> Speed:
    """Give a freshly loaded adapter its speed profile (see the module docstring), each step as
    far as the adapter's capabilities go; returns what it runs with, also given to the adapter
    (``Adapter.use_speed``)."""
    can = adapter.capabilities
    pipe = adapter.pipeline
    device = adapter.runtime.device
    profile = profile_for(spec, vram_class, settings, device)
    # A two-expert model's second transformer takes everything the first does.
    second = getattr(pipe, "transformer_2", None) if pipe is not None else None
    transformer = pipe.transformer if can.compile else None
    transformers = [t for t in (transformer, second if transformer is not None else None) if t is not None]
    # 0. Fused QKV projections, before the LoRA slot wraps their parts.
    fused: list[Any] = []
    if profile.fused_qkv:
        reason = fused_qkv_refused(adapter.runtime, profile.fp8 and fp8_refused(device) is None, transformers)
        if reason is None:
            for module in transformers:
                fused += fused_qkv.fuse(module)
        else:
            log.warning("%s: fused QKV asked for, runs unfused: %s", spec.key, reason)
    # 1. The LoRA slot, before anything is compiled.
    slot = slot_2 = None
    if can.loras and spec.lora_modules is not None and settings.max_loras > 0:
        # Room for the request's LoRAs, and for a variant's where the model has variants.
        rank = settings.lora_max_rank + (settings.variant_lora_rank if spec.variants else 0)
        slot = LoraSlot(pipe, spec.lora_modules, rank)
        if second is not None:
            slot_2 = LoraSlot(pipe, spec.lora_modules, rank, component="transformer_2")
    # 2. Attention.
    attention = _set_attention(transformer, profile, settings.attention_backend, device)
    if transformer is not None and second is not None:
        _set_attention(second, profile, attention, device)
    # 3. FP8 linear layers, where the profile asks and the device has them.
    fp8 = False
    if profile.fp8 and transformers:
        reason = _fp8(transformers, device)
        fp8 = reason is None
        if reason is not None:
            log.warning("%s: FP8 asked for, runs bf16: %s", spec.key, reason)
    # 4. Regional compilation of the transformer's repeated blocks, with CUDA graphs where asked.
    compiled = bool(profile.compile and transformers)
    cuda_graphs = False
    if profile.cuda_graphs:
        reason = cuda_graphs_refused(compiled, device)
        cuda_graphs = reason is None
        if reason is not None:
            log.warning("%s: CUDA graphs asked for, runs without: %s", spec.key, reason)
    blocks: list[Any] = []
    if compiled:
        _allow_recompiles()
        for module in transformers:
            module.compile_repeated_blocks(
                fullgraph=True, **({"mode": "reduce-overhead"} if cuda_graphs else {})
            )
            blocks += [m for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    # 4b. The text encoder's repeated layers, where the transformer is compiled and it is asked.
    text_encoder_compiled = False
    if profile.compile_text_encoder:
        layers = repeated_layers(getattr(pipe, "text_encoder", None)) if compiled else []
        for layer in layers:
            layer.compile()
        text_encoder_compiled = bool(layers)
        if not layers:
            why = "no repeated layers found" if compiled else "the profile runs eager"
            log.warning("%s: text encoder compile asked for, runs eager: %s", spec.key, why)
    speed = Speed(
        spec.key,
        compiled,
        attention,
        slot=slot,
        cache=LoraCache(Path(settings.lora_cache_dir), settings.lora_cache_bytes) if slot else None,
        settings=settings,
        slot_2=slot_2,
        fp8=fp8,
        cuda_graphs=cuda_graphs,
        compiled_blocks=blocks,
        text_encoder_compiled=text_encoder_compiled,
        fused=fused,
        # A two-expert model has no checkpoint variant: its variants are LoRAs, one per expert.
        transformer=pipe.transformer if pipe is not None and second is None else None,
        device=device,
    )
    # Base jobs run with the slot off (and fused, where fused); a job with LoRAs or a variant
    # switches it on.
    speed.switch_slots(False)
    # 5. Warm-up at the class's common sizes, so no job pays a compile.
    if compiled and can.warm_up:
        warm_up(adapter, spec, profile.warm_sizes, speed)
    adapter.use_speed(speed)
    log.info(
        "%s: %s%s%s%s%s, attention %s, LoRA slot %s, warmed %s in %.1f s",
        spec.key,
        "regional compile" if compiled else "eager",
        " with CUDA graphs" if cuda_graphs else "",
        ", FP8 linear layers" if fp8 else "",
        ", text encoder compiled" if text_encoder_compiled else "",
        f", fused QKV in {len(fused)} attention layers" if fused else "",
        attention,
        f"rank {slot.rank} ({speed.extra_bytes / 2**20:.1f} MiB{', two experts' if slot_2 else ''})"
        if slot
        else "none",
        ", ".join("x".join(str(n) for n in size if n) for size in speed.warmed) or "nothing",
        speed.warm_s,
    )
    return speed


def repeated_layers(module: Any) -> list[Any]:
    """The layers of ``module``'s heaviest list of like layers outside a vision tower: a text
    encoder's decoder layers (Qwen2.5-VL's, not its vision blocks); none for a module without."""
    import torch

    if module is None:
        return []
    best: list[Any] = []
    best_size = 0
    for name, candidate in module.named_modules():
        if not isinstance(candidate, torch.nn.ModuleList) or len(candidate) < 2:
            continue
        if "visual" in name or "vision" in name or len({type(layer) for layer in candidate}) != 1:
            continue
        size = sum(p.numel() for p in candidate.parameters())
        if size > best_size:
            best, best_size = list(candidate), size
    return best


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


# Every compiled block of every resident model is an entry in the cache of one code object (the
# module call that regional compilation compiles); each block class has one per LoRA-slot state,
# attention backend and shape class (static at the first size, dynamic after the second). Dynamo's
# default of 8 entries is one Z-Image's: a second model past it would fail to compile.
RECOMPILE_LIMIT = 64


def _allow_recompiles() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


def fp8_refused(device: str) -> str | None:
    """Why FP8 linear layers cannot run on ``device``; None when they can."""
    if not device.startswith("cuda"):
        return f"FP8 GEMMs need a CUDA device, not {device}"
    import importlib.util

    import torch

    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < (8, 9):
        return f"FP8 GEMMs need compute capability 8.9 or more, this GPU has {capability[0]}.{capability[1]}"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    return None


def _fp8(transformers: list[Any], device: str) -> str | None:
    """Give the transformers' linear layers FP8 weights and per-row dynamic FP8 activations
    (torchao); the reason it cannot, or None once done. The LoRA slot's own layers stay as they
    are: a hotswap copies into them."""
    reason = fp8_refused(device)
    if reason is not None:
        return reason
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    for transformer in transformers:
        quantize_(transformer, config, filter_fn=_fp8_layer)
    return None


def _fp8_layer(module: Any, name: str) -> bool:
    import torch

    # FP8 GEMMs take dimensions in multiples of 16.
    return (
        isinstance(module, torch.nn.Linear)
        and "lora_" not in name
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def fused_qkv_refused(runtime: Any, fp8: bool, transformers: list[Any]) -> str | None:
    """Why fused QKV projections cannot run (worker/fused.py); None when they can. ``fp8``: the
    transformer's linear layers will run FP8."""
    if runtime.offload or runtime.expert_offload:
        return "the model moves between host memory and the GPU, and the fused weights' views would not move with it"
    if fp8:
        return "FP8 linear layers quantise each layer's own weights: the fused layer and its parts would be two copies"
    if not any(fused_qkv.fusable(t) for t in transformers):
        return "the transformer has no attention that runs fused (Wan's, Qwen-Image's and Z-Image's have)"
    return None


def cuda_graphs_refused(compiled: bool, device: str) -> str | None:
    if not device.startswith("cuda"):
        return f"CUDA graphs need a CUDA device, not {device}"
    if not compiled:
        return "CUDA graphs come with the compiled blocks, and this profile runs eager"
    return None


# Warm-up prompts of two lengths, taken in turn at the warm sizes: with one length, the text's
# token count would stay a constant of the compiled graphs and a longer prompt would recompile.
WARM_PROMPTS = (
    "warm-up",
    "a warm-up prompt of a few dozen words, so that the text encoder's output, and with it the "
    "transformer's text tokens, differ in length from the first size's: a portrait of a woman in "
    "a red coat on a rainy street at night, neon signs reflected in the puddles, cinematic light, "
    "shallow depth of field, highly detailed photograph",
)


def warm_job(spec: ModelSpec, size: tuple[int, int, int], prompt: str) -> tuple[Any, dict[str, Any]] | None:
    """The warm-up's two-step job at ``size``: its request and made-up inputs (gray images, and for
    Animate gray driving videos in the request's precomputed form: its preprocessing, from a photo
    and a video, does not run); None for kinds whose inputs cannot be made up here."""
    from PIL import Image

    from routing.schemas import parse_request

    width, height, frames = size
    kind = spec.task_kinds[0]
    data: dict[str, Any] = {"model": spec.key, "prompt": prompt, "width": width, "height": height}
    data |= {"steps": 2, "seed": 0, "kind": kind.value}
    inputs: dict[str, Any] = {}
    if kind is TaskKind.TEXT_TO_VIDEO:
        data["frames"] = frames or spec.video.default_frames
    elif kind is TaskKind.EDIT:
        data["images"] = [{"key": "warm-up.png"}]
        inputs["images"] = [Image.new("RGB", (width, height), (128, 128, 128))]
    elif kind is TaskKind.ANIMATE:
        # One segment of ``frames``: the transformer's shapes are a move job's at this size (a mix
        # job's background and mask go into the same conditioning latents).
        count = frames or spec.video.default_frames
        data |= {"mode": "move", "frames": count}
        data |= {name: {"key": f"warm-up.{name}"} for name in ("image", "pose_video", "face_video")}
        gray = Image.new("RGB", (width, height), (128, 128, 128))
        inputs |= {"image": gray, "pose_video": [gray] * count, "face_video": [gray] * count}
    elif kind is not TaskKind.TEXT_TO_IMAGE:
        return None
    return parse_request(data), inputs


def warm_works(spec: ModelSpec, vram_class: VramClass, settings: Settings, device: str) -> list[Work]:
    """The shapes (routing.memory's) of the jobs ``prepare`` warms ``spec`` with on this class and
    device, none where it compiles nothing: the pool makes room for the biggest before the load,
    so a job smaller than the warm sizes cannot leave too little for the warm-up."""
    from routing.memory import work_of

    profile = profile_for(spec, vram_class, settings, device)
    if not profile.compile or spec.key in settings.adapters:
        return []
    jobs = [warm_job(spec, size, WARM_PROMPTS[-1]) for size in profile.warm_sizes]
    return [work_of(job[0], spec) for job in jobs if job is not None]


def _warm(adapter: Adapter, spec: ModelSpec, size: tuple[int, int, int], prompt: str, speed: Speed) -> bool:
    """``warm_job`` with the LoRA slot off, and again with it on where there is one; False for
    kinds whose inputs cannot be made up here (an adapter declaring ``warm_up`` serves none of
    those)."""
    job = warm_job(spec, size, prompt)
    if job is None:
        return False
    request, inputs = job
    adapter.run(request, inputs, lambda step, total: None)
    if speed is not None and speed.slots:
        # The slot holds zeros here: switched on, it computes what the base does.
        speed.switch_slots(True)
        try:
            adapter.run(request, inputs, lambda step, total: None)
        finally:
            speed.switch_slots(False)
    return True


def warm_up(adapter: Adapter, spec: ModelSpec, sizes: Sequence[tuple[int, int, int]], speed: Speed) -> None:
    """Warm ``speed``'s model at ``sizes`` (``_warm``), prompts of two lengths in turn. A size that
    runs out of GPU memory is skipped, saying so, rather than failing the load: the pool made room
    for the warm-up as predicted, so this is the prediction's error; the model still serves, and
    the first job at that size compiles (or runs out of memory and goes to a bigger class)."""
    import torch

    t0 = time.perf_counter()
    for index, size in enumerate(sizes):
        try:
            if _warm(adapter, spec, size, WARM_PROMPTS[index % len(WARM_PROMPTS)], speed):
                speed.warmed.append(size)
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            label = "x".join(str(n) for n in size if n)
            log.warning("%s: warm-up at %s ran out of GPU memory, skipped: %s", spec.key, label, exc)
    speed.warm_s = time.perf_counter() - t0


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

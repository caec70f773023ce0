"""What every pipeline adapter provides, and what the worker gives it."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from routing.catalog import ModelSpec
from routing.memory import WORKER_MODES, Mode, Placement

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from worker.speed import Speed

# Called after every denoising step with (steps done, steps in all). It raises ``JobCanceled``
# when the job should stop, which ends the pipeline call at once.
StepCallback = Callable[[int, int], None]

# Called as the work before the pipeline goes (Animate's preprocessing) with (stage, done, total):
# the stage's name and how much of it is done, at every frame or batch. Like a step callback it
# may raise ``JobCanceled``, which ends that work there.
ProgressCallback = Callable[[str, int, int], None]


class JobCanceled(Exception):
    """Raised from the step callback: the caller canceled the job, stop now."""


@dataclass
class Images:
    """Still images, one per output."""

    images: list[Image.Image]
    seed: int | None = None
    # One seed per image when a job makes several (``seed`` is the first).
    seeds: list[int] = field(default_factory=list)
    # The step-caching method the outputs were made with; None: uncached.
    cache: str | None = None


@dataclass
class Video:
    """The frames of one video at ``fps``, to be encoded by the worker."""

    frames: list[Image.Image]
    fps: int
    seed: int | None = None
    cache: str | None = None
    # Encoded audio (WAV/MP3/FLAC bytes) to mux into the video, e.g. the speech it lip-syncs.
    audio: bytes | None = None
    # Figures of how the adapter ran the job (numbers only), added to the job's timings.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class EncodedVideo:
    """A video already encoded as MP4 (by a multi-GPU group's rank 0), with its shape."""

    data: bytes
    width: int
    height: int
    frame_count: int
    fps: int
    seed: int | None = None
    cache: str | None = None
    # As ``Video.timings``: how the group's model ran the job.
    timings: dict[str, float] = field(default_factory=dict)


# What a pipeline made; ``worker.outputs`` encodes and stores each shape.
Generated = Images | Video | EncodedVideo


# Seconds this process has spent moving pipelines to their device (``Runtime.place``): the pool
# splits a load into reading the weights and this.
_placing = [0.0]


def placing_seconds() -> float:
    return _placing[0]


def count_placing(seconds: float) -> None:
    """Add ``seconds`` an adapter spent placing its modules itself (not through ``Runtime.place``)."""
    _placing[0] += seconds


@dataclass(frozen=True)
class Runtime:
    """Where a pipeline runs: device and dtype, resolved once per worker process, and how the
    worker's class places the model (``routing.memory.Placement``; ``place`` applies it)."""

    device: str
    dtype: torch.dtype
    offload: bool = False  # model CPU offload: one component on the GPU at a time
    vae_tiling: bool = False  # decode images larger than a tile in tiles
    expert_offload: bool = False  # two experts, one on the GPU at a time: the adapter places them

    @property
    def profile(self) -> str:
        mode = "expert-offload" if self.expert_offload else "model-offload" if self.offload else "resident"
        return mode + (" + VAE tiling" if self.vae_tiling else "")

    def placed(self, placement: Placement) -> Runtime:
        """This runtime placing models as ``placement`` says. Modes the workers do not apply
        (``routing.memory.WORKER_MODES``) are refused: the catalog never names them. Expert
        offload is the two-expert adapter's own (``worker.adapters.wan.ExpertPlacement``): the
        runtime records it, and ``place`` refuses it (no other adapter can apply it)."""
        if placement.mode not in WORKER_MODES:
            raise ValueError(f"workers do not place models in {placement.mode.value} mode")
        return replace(
            self,
            offload=placement.mode is Mode.MODEL_OFFLOAD,
            vae_tiling=placement.vae_tiling,
            expert_offload=placement.mode is Mode.EXPERT_OFFLOAD,
        )

    def place(self, pipe: Any) -> None:
        """Put ``pipe`` on the device: whole, or with model CPU offload when ``offload`` is set;
        with VAE tiling when ``vae_tiling`` is.

        Offload moves each component to the GPU only while it runs; on a CPU device there is
        nothing to offload to, so the pipeline simply stays where it is.
        """
        if self.expert_offload:
            raise ValueError("expert offload places a two-expert pipeline's parts itself, not the runtime")
        started = time.perf_counter()
        if self.offload and self.device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        vae = getattr(pipe, "vae", None)
        if self.vae_tiling and vae is not None and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        _placing[0] += time.perf_counter() - started

    def load(self, pipeline_class: str, weights: str, **components: Any) -> Any:
        """``diffusers.<pipeline_class>.from_pretrained(weights)`` in this runtime's dtype, placed
        on its device, quiet. The same call loads hub weights and the small local test models;
        ``components`` replace ones the repository would give."""
        import diffusers

        pipe = getattr(diffusers, pipeline_class).from_pretrained(weights, dtype=self.dtype, **components)
        self.finish(pipe)
        return pipe

    def finish(self, pipe: Any) -> None:
        """Place a pipeline built here and silence its progress bar (workers log, not draw)."""
        self.place(pipe)
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def resolve(cls, device: str, dtype: str) -> Runtime:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            # bfloat16 is what the models were trained in; CPUs run float32 far faster.
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        return cls(device=device, dtype=getattr(torch, dtype))


class Inputs(dict[str, Any]):
    """Decoded input media of a request, by field name: an image field gives a PIL image, a list
    of images a list of them, a video field its frames (list of PIL images) and a
    ``<field>_fps``, an audio field its bytes as stored.

    Beside them: ``stored``, each field's bytes as the store holds them (checked at submit; a
    list field's as a list), for an adapter that hands the media on rather than decoding it
    again; and ``job_id``, the fleet's job the inputs belong to (None outside a job).
    """

    def __init__(
        self,
        decoded: dict[str, Any] | None = None,
        *,
        stored: dict[str, Any] | None = None,
        job_id: str | None = None,
    ):
        super().__init__(decoded or {})
        self.stored: dict[str, Any] = stored or {}
        self.job_id = job_id

    @classmethod
    def decode(
        cls, stored: dict[str, Any], job_id: str | None = None, max_video_pixels: int | None = None
    ) -> Inputs:
        """The inputs ``stored`` (field -> bytes, or a list of bytes for a list of images) hold;
        video frames scaled down to at most ``max_video_pixels`` (the output's size) as they are
        decoded, so a job holds no more than the submit check counted."""
        from routing.schemas import AUDIO_FIELDS, VIDEO_FIELDS
        from worker.media import decode_image, decode_video

        inputs = cls(stored=stored, job_id=job_id)
        for name, data in stored.items():
            if isinstance(data, list):
                inputs[name] = [decode_image(item) for item in data]
            elif name in AUDIO_FIELDS:
                inputs[name] = data  # kept encoded: muxed into the output as is
            elif name in VIDEO_FIELDS:
                inputs[name], inputs[f"{name}_fps"] = decode_video(data, max_pixels=max_video_pixels)
            else:
                inputs[name] = decode_image(data)
        return inputs


@dataclass(frozen=True)
class Capabilities:
    """What an adapter's code can do, declared on its class; the worker reads this, never probes.

    The catalog says which LoRA modules and step-caching methods a *model* takes; these say
    whether the *adapter* serving it can apply them at all.
    """

    # Request LoRAs and variants, hotswapped into a slot on ``pipeline``'s transformer.
    loras: bool = False
    # The request's step cache (``routing.schemas.CacheRequest``), applied around its pipeline call.
    step_cache: bool = False
    # ``pipeline``'s transformer takes the speed profile's attention backend and regional
    # compilation (``compile_repeated_blocks``).
    compile: bool = False
    # A short job at each of the profile's warm sizes can be made up here (no input media it
    # cannot invent), so compiling happens at load rather than in the first jobs.
    warm_up: bool = False


class Adapter(ABC):
    """A model family's pipeline, loaded once per worker process and kept by the pool.

    A subclass declares ``capabilities`` and implements ``run``; ``pipeline`` names the diffusers
    pipeline the speed profile acts on, and ``close`` frees what outlives the adapter object.
    The worker hands over the model's speed profile once, after loading, with ``use_speed``.
    """

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        self.spec = spec
        self.runtime = runtime
        # What the model runs with (LoRA slot, attention, compilation); None: base jobs only.
        self.speed: Speed | None = None

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this adapter can do: a subclass sets it as a class attribute,
        ``capabilities = Capabilities(...)``."""

    @abstractmethod
    def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Generated:
        """Make the request's outputs, calling ``on_step`` after every denoising step."""

    def prepare(
        self, request: Any, inputs: Inputs, timings: dict[str, float], on_progress: ProgressCallback
    ) -> Inputs:
        """Make what ``run`` takes from what the request brought, before the pipeline runs on
        the same device (Animate's preprocessing), reporting to ``on_progress`` as it goes; its
        seconds go into ``timings``."""
        return inputs

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline whose transformer the speed profile acts on; None when the
        adapter has none (it then declares no LoRAs and no compilation)."""
        return None

    def use_speed(self, speed: Speed) -> None:
        """Take the speed profile the worker prepared for this model (``worker.speed.prepare``)."""
        self.speed = speed

    def close(self) -> None:  # noqa: B027 - a hook: most adapters hold nothing beyond themselves
        """Evicted from the pool: free what the adapter holds beyond its own objects."""


def seeded_generator(seed: int | None) -> tuple[int, torch.Generator]:
    """A CPU generator (the same noise on every device) and the seed it used: drawn here when
    the caller gave none, and reported so the output can be made again."""
    import random

    import torch

    seed = seed if seed is not None else random.randrange(2**63)
    return seed, torch.Generator(device="cpu").manual_seed(seed)


def output_seeds(seed: int | None, count: int) -> list[int]:
    """Seeds of a job's ``count`` outputs: ``seed``, ``seed + 1``, ... (drawn when None)."""
    import random

    first = seed if seed is not None else random.randrange(2**63)
    return [(first + i) % 2**63 for i in range(count)]


def per_output(
    seeds: list[int], on_step: StepCallback
) -> Iterator[tuple[torch.Generator, Callable[..., Any]]]:
    """For each output, its generator and a step callback counting the job's steps over all.

    Each output is its own pipeline call with a batch of one: a batched call computes each
    image with other matrix shapes, and those differ from a batch of one in the last bits
    (measured: one pixel level on Z-Image), so an output would not be redone exactly alone
    from its seed.
    """
    import torch

    done = 0

    def on_output_step(_step: int, steps: int) -> None:
        nonlocal done
        done += 1
        on_step(done, steps * len(seeds))

    for seed in seeds:
        yield torch.Generator(device="cpu").manual_seed(seed), step_callback_for(on_output_step)


@contextmanager
def step_cache(transformer: Any, cache: Any) -> Iterator[str | None]:
    """Apply the request's ``cache`` (``routing.schemas.CacheRequest`` or None) to
    ``transformer`` for one job, and remove it after, so the next job runs exactly uncached.
    Yields the method applied (None without one)."""
    if cache is None:
        yield None
        return
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache.method == "first_block":
        config: Any = FirstBlockCacheConfig(threshold=cache.threshold)
    elif cache.method == "taylorseer":
        config = TaylorSeerCacheConfig(
            cache_interval=cache.interval,
            disable_cache_before_step=cache.warmup_steps,
            # Whole transformer blocks, predicted. diffusers' default patterns hook modules named
            # "...attn", which matches Qwen-Image's attention but none of Wan's ("attn1", "attn2"):
            # there it would silently cache nothing.
            cache_identifiers=[r"(transformer_blocks|blocks)\.\d+"],
            # The Taylor factors in the transformer's own dtype (diffusers' default is bfloat16,
            # which would round a float32 model's activations).
            taylor_factors_dtype=transformer.dtype,
        )
    else:
        raise ValueError(f"unknown cache method {cache.method!r}")
    transformer.enable_cache(config)
    try:
        yield cache.method
    finally:
        transformer.disable_cache()


@contextmanager
def variant_scheduler(
    pipe: Any, spec: ModelSpec, request: Any, generator: torch.Generator | None = None
) -> Iterator[None]:
    """For a job of a variant that names its sampling, ``pipe`` runs the scheduler the variant was
    distilled with: DMD steps at its fixed timesteps (``Variant.dmd_timesteps``, fresh noise from
    ``generator``, see ``worker.adapters.dmd``), or the repository's scheduler with the variant's
    changes (``Variant.scheduler``). Every other job, and every job after it, runs the
    repository's own."""
    variant = spec.variants.get(request.variant) if getattr(request, "variant", None) else None
    if variant is None or not (variant.scheduler or variant.dmd_timesteps):
        yield
        return
    own = pipe.scheduler
    if variant.dmd_timesteps:
        from worker.adapters.dmd import dmd_scheduler

        pipe.scheduler = dmd_scheduler(variant.dmd_timesteps, generator)
    else:
        pipe.scheduler = type(own).from_config(own.config, **dict(variant.scheduler))
    try:
        yield
    finally:
        pipe.scheduler = own


def step_callback_for(on_step: StepCallback) -> Callable[..., dict[str, Any]]:
    """A diffusers ``callback_on_step_end`` that reports each step to ``on_step``.

    Canceling raises out of the pipeline rather than setting its ``interrupt`` flag: with the
    flag, diffusers skips the remaining steps but still decodes the latents, which costs a VAE
    pass (tens of seconds for a 720p video) for an output nobody wants.
    """

    def callback(pipe: Any, step_index: int, _timestep: Any, _tensors: dict[str, Any]) -> dict[str, Any]:
        on_step(step_index + 1, pipe.num_timesteps)
        return {}

    return callback

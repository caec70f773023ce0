"""What every pipeline adapter provides, and what the worker gives it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from routing.catalog import ModelSpec

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Called after every denoising step with (steps done, steps in all). It raises ``JobCanceled``
# when the job should stop, which ends the pipeline call at once.
StepCallback = Callable[[int, int], None]


class JobCanceled(Exception):
    """Raised from the step callback: the caller canceled the job, stop now."""


@dataclass
class Generated:
    """What a pipeline made: still images, or the frames of one video at ``fps``."""

    images: list[Image.Image] = field(default_factory=list)
    frames: list[Image.Image] = field(default_factory=list)
    fps: int | None = None
    seed: int | None = None
    # Encoded audio (WAV/MP3/FLAC bytes) to mux into the video, e.g. the speech it lip-syncs.
    audio: bytes | None = None
    # A video already encoded as MP4 (by a multi-GPU group's rank 0), with its shape.
    encoded: bytes | None = None
    width: int | None = None
    height: int | None = None
    frame_count: int | None = None


# Seconds this process has spent moving pipelines to their device (``Runtime.place``): the pool
# splits a load into reading the weights and this.
_placing = [0.0]


def placing_seconds() -> float:
    return _placing[0]


@dataclass(frozen=True)
class Runtime:
    """Where a pipeline runs: device and dtype, resolved once per worker process, and whether
    models that do not fit the worker's class are offloaded (``place`` applies it)."""

    device: str
    dtype: torch.dtype
    offload: bool = False

    @property
    def profile(self) -> str:
        return "offload" if self.offload else "resident"

    def place(self, pipe: Any) -> None:
        """Put ``pipe`` on the device: whole, or with model CPU offload when ``offload`` is set.

        Offload moves each component to the GPU only while it runs; on a CPU device there is
        nothing to offload to, so the pipeline simply stays where it is.
        """
        started = time.perf_counter()
        if self.offload and self.device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
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


# Decoded input media of a request, by field name: an image field gives a PIL image, a list of
# images a list of them, a video field its frames (list of PIL images) and a ``<field>_fps``.
Inputs = dict[str, Any]


class Adapter(Protocol):
    spec: ModelSpec

    def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Generated: ...


def seeded_generator(seed: int | None) -> tuple[int, torch.Generator]:
    """A CPU generator (the same noise on every device) and the seed it used: drawn here when
    the caller gave none, and reported so the output can be made again."""
    import random

    import torch

    seed = seed if seed is not None else random.randrange(2**63)
    return seed, torch.Generator(device="cpu").manual_seed(seed)


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

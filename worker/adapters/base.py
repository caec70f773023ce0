"""What every pipeline adapter provides, and what the worker gives it."""

from __future__ import annotations

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
    images: list[Image.Image] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class Runtime:
    """Where a pipeline runs: device and dtype, resolved once per worker process."""

    device: str
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str, dtype: str) -> Runtime:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            # bfloat16 is what the models were trained in; CPUs run float32 far faster.
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        return cls(device=device, dtype=getattr(torch, dtype))


class Adapter(Protocol):
    spec: ModelSpec

    def run(self, request: Any, on_step: StepCallback) -> Generated: ...


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

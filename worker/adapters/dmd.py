"""Few-step sampling of a distribution-matching-distilled (DMD) model, as FastVideo samples its
FastWan checkpoints: the steps run at fixed timesteps (FastWan2.2-TI2V-5B: 1000, 757, 522); at each,
the model's flow prediction gives the clean latents (x0 = x_t - sigma_t * v), and the next step
starts from them noised afresh to its own level (x = (1 - sigma) * x0 + sigma * noise, sigma =
t / 1000); the last step's clean latents are the result.

That is diffusers' ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling`` on, at the fixed
sigmas t / 1000 and no shift, its fresh noise drawn from the job's generator (the pipelines pass
none to ``step``), so a seed makes the same video again.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


class DmdScheduler(FlowMatchEulerDiscreteScheduler):
    dmd_timesteps: tuple[int, ...] = ()
    generator: torch.Generator | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **_: Any) -> None:
        if num_inference_steps is not None and num_inference_steps != len(self.dmd_timesteps):
            raise ValueError(
                f"this checkpoint runs exactly {len(self.dmd_timesteps)} steps, at timesteps "
                f"{list(self.dmd_timesteps)} (asked for {num_inference_steps})"
            )
        train = self.config.num_train_timesteps
        super().set_timesteps(sigmas=[t / train for t in self.dmd_timesteps], device=device)

    def step(self, *args: Any, generator: torch.Generator | None = None, **kwargs: Any) -> Any:
        return super().step(*args, generator=generator or self.generator, **kwargs)


def dmd_scheduler(timesteps: tuple[int, ...], generator: torch.Generator | None) -> DmdScheduler:
    """A scheduler for one job: ``timesteps``' steps, its fresh noise from ``generator``."""
    scheduler = DmdScheduler(num_train_timesteps=1000, shift=1.0, stochastic_sampling=True)
    scheduler.dmd_timesteps = tuple(timesteps)
    scheduler.generator = generator
    return scheduler

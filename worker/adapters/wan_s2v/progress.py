"""Per-step progress out of the official tasks' ``generate`` (``WanS2V``, ``WanT2V``, ``WanI2V``),
whose denoising loops have no callback.

While a job runs, the scheduler classes the loop builds are subclasses whose ``step`` calls the
job's hook, which may raise ``JobCanceled``: the loop ends at that step on every rank, since every
rank reports the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.adapters.wan_s2v.patch import Patch


def _reporting_to(hook: Callable[[], None]) -> Callable[[type], type]:
    def reporting(scheduler_class: type) -> type:
        class Reporting(scheduler_class):  # type: ignore[misc, valid-type]
            def step(self, *args: Any, **kwargs: Any) -> Any:
                result = super().step(*args, **kwargs)
                hook()
                return result

        Reporting.__name__ = Reporting.__qualname__ = scheduler_class.__name__
        return Reporting

    return reporting


# The official modules whose ``generate`` the group runs, one per task.
MODULES = ("wan.speech2video", "wan.text2video", "wan.image2video")


def patches(hook: Callable[[], None], modules: tuple[str, ...] = MODULES) -> tuple[Patch, ...]:
    """Both samplers each task's ``generate`` builds (``sample_solver`` unipc or dpm++), in each of
    ``modules``, reporting to ``hook`` after each step."""
    return tuple(
        Patch(module, name, _reporting_to(hook), "the denoising loop has no step callback")
        for module in modules
        for name in ("FlowUniPCMultistepScheduler", "FlowDPMSolverMultistepScheduler")
    )


@dataclass
class Progress:
    """Steps done of ``steps_per_clip * clips``; ``clips`` is known once the speech is encoded."""

    steps_per_clip: int
    clips: int
    done: int = 0

"""The routing decision: which VRAM class, and so which queue, a request goes to."""

from __future__ import annotations

from dataclasses import dataclass

from routing.catalog import get_model
from routing.classes import VramClass, bigger_classes
from routing.schemas import GenerationRequest


@dataclass(frozen=True)
class Route:
    vram_class: VramClass

    @property
    def queue(self) -> str:
        return self.vram_class.queue


def work(request: GenerationRequest) -> int:
    """Pixels the request makes, over all frames: what activation memory grows with."""
    width = request.width or 0
    height = request.height or 0
    return width * height * (getattr(request, "frames", None) or 1)


def route(request: GenerationRequest) -> Route:
    """The smallest class that can run ``request``.

    Start at the model's class in the catalog; move up while the request's work is above what
    that class takes for the model (``ModelSpec.max_work``). Jobs also run on bigger classes
    when those are idle: that is the workers' subscription (``routing.classes.consumed_queues``),
    not a decision taken here, so a job is queued where it fits and a bigger worker pulls it
    only when its own queue is empty.
    """
    spec = get_model(request.model)
    vram_class = spec.vram_class
    amount = work(request)
    while vram_class in spec.max_work and amount > spec.max_work[vram_class]:
        bigger = bigger_classes(vram_class)
        if not bigger:
            break
        vram_class = bigger[0]
    return Route(vram_class)


def escalate(current: VramClass) -> Route | None:
    """Where a job goes after running out of GPU memory on ``current``: the next bigger class."""
    bigger = bigger_classes(current)
    return Route(bigger[0]) if bigger else None

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


def route(request: GenerationRequest) -> Route:
    """The smallest class that can run ``request``.

    A model's class in the catalog is where its default request fits. Jobs for a small-class
    model also run on bigger classes when those are idle; that is the workers' subscription
    (``routing.classes.consumed_queues``), not a decision taken here, so a job is always queued
    where it fits and a big worker pulls it only when its own queue is empty.
    """
    return Route(get_model(request.model).vram_class)


def escalate(current: VramClass) -> Route | None:
    """Where a job goes after running out of GPU memory on ``current``: the next bigger class."""
    bigger = bigger_classes(current)
    return Route(bigger[0]) if bigger else None

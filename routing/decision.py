"""The routing decision: which VRAM class, and so which queue, a request goes to."""

from __future__ import annotations

from dataclasses import dataclass

from routing import memory
from routing.catalog import get_model
from routing.classes import VramClass, bigger_classes
from routing.errors import FieldError, InvalidRequest
from routing.schemas import GenerationRequest


@dataclass(frozen=True)
class Route:
    vram_class: VramClass

    @property
    def queue(self) -> str:
        return self.vram_class.queue


def route(request: GenerationRequest, margin_gib: float | None = None) -> Route:
    """The smallest class whose card holds the request's predicted peak.

    Each class that runs the model places it its own way (``ModelSpec.placements``); the
    request's peak in that placement (``routing.memory``) must fit the card less the margin
    (``FLEET_VRAM_MARGIN_GIB``; ``margin_gib`` overrides it). A request no class holds is refused
    with ``InvalidRequest`` naming the largest size or length that fits, before anything is
    queued. Jobs also run on bigger classes when those are idle: that is the workers'
    subscription (``routing.classes.consumed_queues``), not a decision taken here. Out-of-memory
    escalation (``escalate``) stays the backstop for a prediction that was wrong.

    A model without memory data (a catalog entry added before its data) goes to its home class.
    """
    spec = get_model(request.model)
    if not memory.has_data(spec.key):
        return Route(spec.vram_class)
    work = memory.work_of(request, spec)
    found = memory.smallest_fitting_class(spec, work, margin_gib)
    if found is None:
        field, message = memory.limit_message(spec, work, margin_gib)
        raise InvalidRequest([FieldError(field, message)])
    return Route(found)


def escalate(current: VramClass) -> Route | None:
    """Where a job goes after running out of GPU memory on ``current``: the next bigger class."""
    bigger = bigger_classes(current)
    return Route(bigger[0]) if bigger else None

"""VRAM classes, their queues, and which queues a worker of each class consumes."""

from __future__ import annotations

from enum import StrEnum


class VramClass(StrEnum):
    """A class of GPU machine. The value is also the name of the class's Celery queue."""

    GPU16 = "gpu16"  # one 16-24 GB GPU (g5 / g6)
    GPU80 = "gpu80"  # one 80 GB GPU (H100 / A100 80GB)
    H100X8 = "h100x8"  # eight H100 under one torchrun group

    @property
    def queue(self) -> str:
        return self.value

    @property
    def vram_gb(self) -> int:
        return _VRAM_GB[self]

    @property
    def rank(self) -> int:
        """Position by size: a class serves every class of lower rank."""
        return _ORDER.index(self)


_ORDER = [VramClass.GPU16, VramClass.GPU80, VramClass.H100X8]
_VRAM_GB = {VramClass.GPU16: 16, VramClass.GPU80: 80, VramClass.H100X8: 8 * 80}

# Queues that carry no GPU work. Webhook delivery runs on CPU workers.
WEBHOOK_QUEUE = "webhooks"


def consumed_queues(vram_class: VramClass) -> list[str]:
    """Queues a worker of ``vram_class`` consumes, in the order it prefers them.

    Its own queue first, then each smaller class's from the biggest down: a big idle GPU takes
    small jobs rather than sit idle, but never before its own work. The worker's broker
    connection polls in this order (see ``routing.celery_config``), so the order is a real
    preference, not a hint.
    """
    smaller = [c for c in reversed(_ORDER) if c.rank < vram_class.rank]
    return [vram_class.queue, *(c.queue for c in smaller)]


def bigger_classes(vram_class: VramClass) -> list[VramClass]:
    """Classes above ``vram_class``, smallest first: where a job escalates after an OOM."""
    return [c for c in _ORDER if c.rank > vram_class.rank]

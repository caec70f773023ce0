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
        """GPU memory of the whole machine."""
        return _VRAM_GB[self]

    @property
    def gpu_vram_gb(self) -> int:
        """Memory of one of its GPUs: what a model (a single-GPU pipeline, or one rank of a
        sharded one) must fit in."""
        return _VRAM_GB[self] // _GPUS[self]

    @property
    def gpus(self) -> int:
        """GPUs a worker of the class holds: a job's GPU-seconds are this many times its time."""
        return _GPUS[self]

    @property
    def rank(self) -> int:
        """Position by size: a class serves every class of lower rank."""
        return _ORDER.index(self)


_ORDER = [VramClass.GPU16, VramClass.GPU80, VramClass.H100X8]
_VRAM_GB = {VramClass.GPU16: 16, VramClass.GPU80: 80, VramClass.H100X8: 8 * 80}
_GPUS = {VramClass.GPU16: 1, VramClass.GPU80: 1, VramClass.H100X8: 8}

# Queues that carry no GPU work. Webhook delivery runs on CPU workers.
WEBHOOK_QUEUE = "webhooks"


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


_PRIORITY_ORDER = [Priority.HIGH, Priority.NORMAL, Priority.LOW]


def queue_name(vram_class: VramClass, priority: Priority = Priority.NORMAL) -> str:
    """The queue of a class at a priority: ``gpu16.high``, ``gpu16``, ``gpu16.low``.

    Priorities are separate queues rather than Kombu's priority lists: Kombu polls priority
    first across all of a worker's queues, which would let a small class's high-priority job
    jump ahead of a big worker's own work.
    """
    return vram_class.queue if priority is Priority.NORMAL else f"{vram_class.queue}.{priority.value}"


def parse_queue(name: str) -> tuple[VramClass, Priority]:
    """The class and priority of a queue named by ``queue_name``: ``gpu16.high`` is
    ``(GPU16, HIGH)``, ``gpu16`` is ``(GPU16, NORMAL)``. Raises ``ValueError`` for any other name."""
    class_name, dot, priority = name.partition(".")
    vram_class = VramClass(class_name)
    if not dot:
        return vram_class, Priority.NORMAL
    if priority == Priority.NORMAL.value:  # the normal queue has no suffix
        raise ValueError(f"{name!r} is not a queue name; the normal queue is {class_name!r}")
    return vram_class, Priority(priority)


def class_queues(vram_class: VramClass) -> list[str]:
    """A class's queues, highest priority first."""
    return [queue_name(vram_class, p) for p in _PRIORITY_ORDER]


def consumed_queues(vram_class: VramClass) -> list[str]:
    """Queues a worker of ``vram_class`` consumes, in the order it prefers them.

    Its own class first (high, normal, low), then each smaller class's from the biggest down: a
    big idle GPU takes small jobs rather than sit idle, but never before its own work. The
    worker's broker connection polls in this order (see ``routing.celery_config``), so the
    order is a real preference, not a hint.
    """
    smaller = [c for c in reversed(_ORDER) if c.rank < vram_class.rank]
    return [q for c in [vram_class, *smaller] for q in class_queues(c)]


def bigger_classes(vram_class: VramClass) -> list[VramClass]:
    """Classes above ``vram_class``, smallest first: where a job escalates after an OOM."""
    return [c for c in _ORDER if c.rank > vram_class.rank]

"""Every Redis key the fleet writes, named in one place.

The Celery queues themselves are plain lists named after the VRAM class (``routing.classes``);
everything else lives under the settings' ``key_prefix``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "fleet"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def idempotency(self, idempotency_key: str) -> str:
        return f"{self.prefix}:idem:{idempotency_key}"

    @property
    def events(self) -> str:
        """Stream of every job state change and progress step (``routing.jobs.EventType``)."""
        return f"{self.prefix}:events"

    @property
    def load_counts(self) -> str:
        """Hash of model loads per worker process: ``<worker name>:<model>`` -> count."""
        return f"{self.prefix}:loads"

    @property
    def eviction_counts(self) -> str:
        """Hash of model evictions per worker process: ``<worker name>:<model>`` -> count."""
        return f"{self.prefix}:evictions"

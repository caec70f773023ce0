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
        """Stream of every job state change and progress step (``routing.jobs.events.EventType``)."""
        return f"{self.prefix}:events"

    def tenant_in_flight(self, tenant: str) -> str:
        """Set of a tenant's unfinished job ids (the in-flight limit counts it)."""
        return f"{self.prefix}:tenant:{tenant}:inflight"

    def tenant_jobs(self, tenant: str) -> str:
        """Sorted set of a tenant's job ids by creation time (listing)."""
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def queued(self, queue: str) -> str:
        """Sorted set of the job ids waiting in ``queue``, in arrival order (queue position)."""
        return f"{self.prefix}:queued:{queue}"

    @property
    def sequence(self) -> str:
        """Counter giving every queued job its place in line."""
        return f"{self.prefix}:seq"

    @property
    def durations(self) -> str:
        """Hash ``<model>|<class>`` -> moving average of run seconds (ETA)."""
        return f"{self.prefix}:durations"

    def worker(self, name: str) -> str:
        """A live worker's heartbeat: its class, expiring when it stops refreshing."""
        return f"{self.prefix}:worker:{name}"

    @property
    def running(self) -> str:
        """Set of the ids of jobs a worker holds (the reaper checks their workers are alive)."""
        return f"{self.prefix}:running"

    @property
    def dead_letters(self) -> str:
        """List of jobs given up after too many attempts (JSON: id, attempts, reason, at)."""
        return f"{self.prefix}:dead"

    def drain(self, worker_process: str) -> str:
        """Set while a worker process shuts down: its running job hands itself back."""
        return f"{self.prefix}:drain:{worker_process}"

    def metrics(self, name: str) -> str:
        """Hashes of fleet metrics (``submitted``, ``finished``, ``run_s``; ``load_s``:
        ``<model>|<class>|read|to_device|count``; ``gpu_busy``: ``<class>|busy_s|work_s``, what
        the capacity planner reads): producer/metrics.py."""
        return f"{self.prefix}:metrics:{name}"

    def webhooks_disabled(self, tenant: str) -> str:
        """Set of the tenant's webhook URLs that answered 410 Gone."""
        return f"{self.prefix}:webhooks:disabled:{tenant}"

    def webhook_log(self, job_id: str) -> str:
        """List of the job's delivery attempts, oldest first (JSON entries)."""
        return f"{self.prefix}:webhooks:log:{job_id}"

    @property
    def load_counts(self) -> str:
        """Hash of model loads per worker process: ``<worker name>:<model>`` -> count."""
        return f"{self.prefix}:loads"

    @property
    def eviction_counts(self) -> str:
        """Hash of model evictions per worker process: ``<worker name>:<model>`` -> count."""
        return f"{self.prefix}:evictions"

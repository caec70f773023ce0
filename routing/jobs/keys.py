"""Every Redis key the fleet writes, named in one place.

The Celery queues themselves are plain lists named after the VRAM class (``routing.classes``);
everything else lives under the settings' ``key_prefix``. The Lua scripts (``routing.jobs.scripts``)
spell no key name: they get each one from here, by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# Stands for the value a script reads inside Redis (a job's queue, its tenant) while a key name
# is cut into a template (``Keys.template``).
HOLE = "{}"

# A job id as the fleet makes them (``uuid4().hex``). Ids from callers are checked against it
# before they are cut into a key name: ``<id>:events`` must not name another key of the job.
JOB_ID = re.compile(r"[0-9a-f]{32}")


def is_job_id(text: str) -> bool:
    return JOB_ID.fullmatch(text) is not None


@dataclass(frozen=True)
class Keys:
    prefix: str = "fleet"

    def template(self, build: Callable[[str], str]) -> list[str]:
        """The key ``build`` makes, cut where its argument goes: ``[head, tail]``, which a
        script joins as ``head .. value .. tail`` around a value it reads inside Redis."""
        head, _, tail = build(HOLE).rpartition(HOLE)
        return [head, tail]

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def deleted_job(self, job_id: str) -> str:
        """Hash of the tenant and kind of a job deleted on request, for ``deleted_job_ttl_s``
        after (a repeated delete is answered as the first: ``JobStore.deleted``)."""
        return f"{self.prefix}:deleted:{job_id}"

    def job_events(self, job_id: str) -> str:
        """Stream of one job's events (the API's ``/v1/jobs/{id}/events``), written with each
        event of ``events`` and expiring with the record (``routing.jobs.scripts.JOB_EMIT``)."""
        return f"{self.job(job_id)}:events"

    def idempotency(self, idempotency_key: str) -> str:
        return f"{self.prefix}:idem:{idempotency_key}"

    @property
    def replication_fence(self) -> str:
        """Written before a ``WAIT`` that answers for writes of other connections (an earlier job
        a submit answers again): its count then covers them (``routing.io.connection.Replication``)."""
        return f"{self.prefix}:replication-fence"

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
    def waiting(self) -> str:
        """Sorted set of the ids of every queued job, whatever its queue, by ``created_at``: the
        expiry sweep (``routing.jobs.expiry``) finds the ones past ``max_wait_s`` here."""
        return f"{self.prefix}:waiting"

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
    def workers(self) -> str:
        """Sorted set of worker names by the time of their last heartbeat: where readers find
        the heartbeat keys without scanning the keyspace (``routing.jobs.workers``)."""
        return f"{self.prefix}:workers"

    @property
    def holders(self) -> str:
        """Sorted set of the worker main processes (the ones that take messages from the broker)
        by the time of their last beat or take: where the reaper finds the ones that died holding
        messages (``worker.held``)."""
        return f"{self.prefix}:holders"

    def holder(self, name: str) -> str:
        """A live worker main process's heartbeat (it holds the messages its pool child runs)."""
        return f"{self.prefix}:holder:{name}"

    def held(self, name: str) -> str:
        """Set of the delivery tags of the broker messages worker main process ``name`` took and
        may not have acknowledged yet (``worker.held``)."""
        return f"{self.prefix}:held:{name}"

    @property
    def running(self) -> str:
        """Set of the ids of jobs a worker holds (the reaper checks their workers are alive)."""
        return f"{self.prefix}:running"

    @property
    def dead_letters(self) -> str:
        """List of jobs given up after too many attempts, newest first (JSON: id, attempts,
        reason, at); trimmed to the newest ``max_dead_letters``."""
        return f"{self.prefix}:dead"

    def drain(self, worker_process: str) -> str:
        """Set while a worker process shuts down: its running job hands itself back."""
        return f"{self.prefix}:drain:{worker_process}"

    def metrics(self, name: str) -> str:
        """Hashes of fleet metrics (``submitted``, ``finished``, ``run_s``; ``load_s``:
        ``<model>|<class>|read|to_device|count``; ``gpu_busy``: ``<class>|busy_s|work_s``, what
        the capacity planner reads; ``tenants``: ``<tenant>|<model>|<class>|<status>|jobs|held_s``,
        all-time usage): producer/metrics.py."""
        return f"{self.prefix}:metrics:{name}"

    def usage(self, day: int, tenant: str) -> str:
        """Hash of what ``tenant`` (its store folder: ``_`` for no tenant) used on UTC ``day``
        (days since 1970-01-01), written as its jobs end (``routing.jobs.usage``)."""
        return f"{self.prefix}:usage:{day}:{tenant}"

    def usage_month(self, month: str, tenant: str) -> str:
        """Hash of the seconds ``tenant``'s jobs that ended in UTC ``month`` (``YYYY-MM``) held
        workers, by class, and ``counted`` once it holds the whole month: what a monthly GPU
        budget is checked against on each submit (``routing.jobs.usage.month_gpu_s``)."""
        return f"{self.prefix}:usage-month:{month}:{tenant}"

    def usage_tenants(self, day: int) -> str:
        """Set of the tenants (their folders) with a ``usage`` hash on ``day``."""
        return f"{self.prefix}:usage:{day}"

    def api_key(self, digest: str) -> str:
        """``<tenant> <id>`` of the managed API key whose SHA-256 is ``digest`` (producer.api_keys)."""
        return f"{self.prefix}:apikey:{digest}"

    def tenant_api_keys(self, tenant: str) -> str:
        """Hash of the tenant's managed API keys: id -> their digest, label and creation time."""
        return f"{self.prefix}:tenant:{tenant}:apikeys"

    def webhooks_disabled(self, tenant: str) -> str:
        """Set of the tenant's webhook URLs that answered 410 Gone."""
        return f"{self.prefix}:webhooks:disabled:{tenant}"

    def webhook_log(self, job_id: str) -> str:
        """List of the job's delivery attempts, oldest first (JSON entries)."""
        return f"{self.prefix}:webhooks:log:{job_id}"

    def webhook_attempt(self, delivery_id: str, attempt: int) -> str:
        """Claim of one attempt of one delivery (its Celery task id): whichever copy of the
        message sets it makes the attempt (``worker.webhooks``); expires after the retries."""
        return f"{self.prefix}:webhooks:attempt:{delivery_id}:{attempt}"

    def replays_of_job(self, job_id: str) -> str:
        """Counter of the job's webhook replays in the current window (expires with it)."""
        return f"{self.prefix}:webhooks:replays:job:{job_id}"

    def replays_of_tenant(self, tenant: str) -> str:
        """Counter of the tenant's webhook replays in the current window (expires with it)."""
        return f"{self.prefix}:webhooks:replays:tenant:{tenant}"

    def rate(self, action: str, tenant: str) -> str:
        """Counter of the tenant's ``action`` (submit, cancel) in the current window (expires
        with it)."""
        return f"{self.prefix}:rate:{action}:{tenant}"

    @property
    def load_counts(self) -> str:
        """Hash of model loads per class: ``<class>:<model>`` -> count (one field per class and
        model, however often workers restart)."""
        return f"{self.prefix}:loads"

    @property
    def eviction_counts(self) -> str:
        """Hash of model evictions per class: ``<class>:<model>`` -> count."""
        return f"{self.prefix}:evictions"

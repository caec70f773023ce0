"""The job record: one Redis hash per job, and every change to it.

Each state change is a named move (``routing.jobs.lifecycle``) made by one Lua script: it checks
the move against the job's state and its fence, writes the record and appends the event to the
events stream in one atomic step, so the status API, Flower and webhooks can never see a record
and an event that disagree.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import Any

import redis

from routing.classes import WEBHOOK_QUEUE, parse_queue
from routing.errors import Conflict, ErrorType, FieldError, InvalidRequest, JobError, NotFound, NotReplicated
from routing.io.connection import Replication
from routing.jobs import lifecycle, scripts, usage
from routing.jobs.codecs import encode_label
from routing.jobs.events import EventType, Webhook
from routing.jobs.keys import Keys
from routing.jobs.lifecycle import Move, Moved
from routing.jobs.messages import TaskMessages
from routing.jobs.record import JobRecord, JobStatus
from routing.limits import RequestLimits
from routing.settings import NO_TENANT

_EVENT_FOR = {
    JobStatus.QUEUED: EventType.QUEUED,
    JobStatus.RUNNING: EventType.STARTED,
    JobStatus.SUCCEEDED: EventType.SUCCEEDED,
    JobStatus.FAILED: EventType.FAILED,
    JobStatus.CANCELED: EventType.CANCELED,
}


@dataclass(frozen=True)
class Step:
    status: JobStatus | None
    cancel: bool  # canceled, or no longer running: stop and drop the work
    drain: bool  # the worker is shutting down: stop and hand the job back
    # The job runs again as another worker's or attempt's (this one was thought dead): stop
    # without touching it; nothing of this step was written.
    superseded: bool = False


@dataclass(frozen=True)
class Deleted:
    """What is kept of a job deleted on request, for ``deleted_ttl_s``: whose it was, and its
    kind (so a door answers a repeat only for the jobs it shows)."""

    tenant: str
    kind: str


@dataclass(frozen=True)
class Cursor:
    """Where a page of a tenant's jobs ended: its last job's ``created_at`` and id. Written
    ``<created_at>:<id>``; callers pass it back as they got it."""

    created_at: float
    job_id: str

    def __str__(self) -> str:
        return f"{self.created_at!r}:{self.job_id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        created_at, _, job_id = text.partition(":")
        try:
            cursor = cls(float(created_at), job_id)
        except ValueError:
            cursor = None
        if cursor is None or not job_id or not math.isfinite(cursor.created_at):
            raise InvalidRequest([FieldError("cursor", "pass back a next_cursor as it was given")])
        return cursor


# The orders a tenant's jobs are listed in: newest first, oldest first.
ORDERS = ("desc", "asc")


class Created(IntEnum):
    EXISTS = 0
    CREATED = 1
    LIMITED = 2


@dataclass(frozen=True)
class NewJob:
    id: str
    model: str
    kind: str
    request_json: str
    queue: str
    message: tuple[str, str]  # (Redis list key, payload): see routing.jobs.messages
    idempotency_key: str | None = None
    request_hash: str = ""
    tenant: str = ""
    priority: str = "normal"
    webhook: Webhook | None = None
    max_in_flight: int = 0  # the tenant's limit on unfinished jobs; 0: none
    limits: RequestLimits | None = None  # what the request was accepted under
    traceparent: str | None = None  # the submit's span (routing.tracing), the parent of its runs


class JobStore:
    """Reads and changes job records. Safe to share between threads (redis-py pools connections)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        ttl_s: int,
        messages: TaskMessages | None = None,
        events_maxlen: int = 100_000,
        progress_webhook_interval_s: float = 2.0,
        canceled_ttl_s: int | None = None,
        deleted_ttl_s: int = 3600,
        usage_retention_days: int = usage.DEFAULT_RETENTION_DAYS,
        replication: Replication | None = None,
    ):
        self.client = client
        # Replicas that must hold a new job before ``create`` returns, and a move before ``move``
        # returns (FLEET_REDIS_MIN_REPLICAS); none by default.
        self.replication = replication or Replication()
        self.keys = keys
        self.ttl_s = ttl_s
        # How long the record of a job canceled before it started is kept (ttl_s when None).
        self.canceled_ttl_s = canceled_ttl_s or ttl_s
        # How long a job deleted on request is remembered (``deleted``).
        self.deleted_ttl_s = deleted_ttl_s
        # Days each day of a tenant's usage is kept after it (routing.jobs.usage).
        self.usage_retention_days = usage_retention_days
        # Builds webhook delivery messages; without it no webhook is ever queued.
        self.messages = messages
        self.events_maxlen = events_maxlen
        self.progress_webhook_interval_s = progress_webhook_interval_s
        self._transition = client.register_script(scripts.TRANSITION)
        self._create = client.register_script(scripts.CREATE)
        self._progress = client.register_script(scripts.PROGRESS)
        self._check = client.register_script(scripts.CHECK)
        self._request_cancel = client.register_script(scripts.REQUEST_CANCEL)
        self._list_page = client.register_script(scripts.LIST_PAGE)
        self._forget = client.register_script(scripts.FORGET)

    def create(self, jobs: list[NewJob]) -> list[tuple[Created, str]]:
        """Write each new job's queued record, its ``job.queued`` event and its queue message in
        one atomic step per job, all jobs in one round trip.

        Returns (outcome, job id) per job: ``CREATED``; ``EXISTS`` when its idempotency key was
        used already (nothing written, the id is the earlier job's); ``LIMITED`` when its tenant
        has ``max_in_flight`` unfinished jobs (nothing written). With ``FLEET_REDIS_MIN_REPLICAS``
        it returns once the replicas hold the created jobs and the earlier ones alike (and every
        job the master took before), else raises ``NotReplicated``.
        """
        now = repr(time.time())
        calls = [self._create_call(job, now) for job in jobs]
        replies, held = self.replication.run(
            self.client, self._create, calls, fence=self.keys.replication_fence
        )
        outcomes = [(Created(int(outcome)), _text(found_id)) for outcome, found_id in replies]
        self._check_replicated(held, outcomes)
        return outcomes

    def confirm(self, outcomes: list[tuple[Created, str]]) -> None:
        """Return once the replicas hold the jobs of ``outcomes`` (jobs found by their idempotency
        keys, written by an earlier submit), else raise ``NotReplicated``: a submit answers an
        earlier job with the same promise as a new one. Without ``FLEET_REDIS_MIN_REPLICAS``, at once."""
        self._check_replicated(self.replication.confirm(self.client, self.keys.replication_fence), outcomes)

    def _check_replicated(self, held: int | None, outcomes: list[tuple[Created, str]]) -> None:
        if self.replication.short(held) and any(outcome is not Created.LIMITED for outcome, _ in outcomes):
            raise NotReplicated(
                f"the job store's master holds the job, but {held} of {self.replication.replicas} "
                f"replicas (FLEET_REDIS_MIN_REPLICAS) confirmed it within {self.replication.timeout_ms} "
                "ms: a failover could lose it; submit again with the same Idempotency-Key",
                outcomes,
            )

    def _create_call(self, job: NewJob, now: str) -> str:
        fields = {
            "id": job.id,
            "model": job.model,
            "kind": job.kind,
            "request": job.request_json,
            "request_hash": job.request_hash,
            "status": JobStatus.QUEUED.value,
            "queue": job.queue,
            "attempt": "0",
            "step": "0",
            "total_steps": "0",
            "created_at": now,
            "updated_at": now,
            "cancel_requested": "0",
            "idempotency_key": job.idempotency_key or "",
            "tenant": job.tenant,
            "priority": job.priority,
            "webhook_url": job.webhook.url if job.webhook else "",
            "webhook_events": ",".join(job.webhook.events) if job.webhook else "",
            # Kept while queued: a cancel takes this very message off its list (scripts.TRANSITION).
            "queued_message": job.message[1],
            "queued_list": job.message[0],
            "limits": job.limits.to_json() if job.limits else "",
            "traceparent": job.traceparent or "",
        }
        queue_key, payload = job.message
        keys = {
            "job": self.keys.job(job.id),
            "job_events": self.keys.job_events(job.id),
            "events": self.keys.events,
            "idempotency": self.keys.idempotency(job.idempotency_key) if job.idempotency_key else "",
            "queue": queue_key,
            "in_flight": self.keys.tenant_in_flight(job.tenant),
            "jobs": self.keys.tenant_jobs(job.tenant),
            "line": self.keys.queued(job.queue),
            "waiting": self.keys.waiting,
            "sequence": self.keys.sequence,
            "submitted": self.keys.metrics("submitted"),
        }
        return _args(
            keys=keys,
            id=job.id,
            now=now,
            maxlen=str(self.events_maxlen),
            ttl_s=str(self.ttl_s),
            message=payload,
            limit=str(job.max_in_flight),
            label=encode_label(job.model, parse_queue(job.queue)[0].value),
            fields=_flatten(fields),
        )

    def get(self, job_id: str) -> JobRecord:
        raw = self.client.hgetall(self.keys.job(job_id))
        if not raw:
            raise NotFound(f"no job {job_id!r}")
        return JobRecord.from_hash({_text(k): _text(v) for k, v in raw.items()})

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        """The records of ``job_ids`` in one round trip; None for a job that no longer exists."""
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.job(job_id))
            raws = pipe.execute()
        return [
            JobRecord.from_hash({_text(k): _text(v) for k, v in raw.items()}) if raw else None for raw in raws
        ]

    def request_hash(self, job_id: str) -> str:
        return _text(self.client.hget(self.keys.job(job_id), "request_hash") or b"")

    def move(self, job_id: str, move: Move) -> Moved:
        """Make ``move`` (one of ``routing.jobs.lifecycle``'s) in one atomic step: only from one
        of its sources, and only while its owner and attempt, where it names them, still hold.

        A move back to ``queued`` pushes the job's message onto its queue in the same step: a
        handed-back job is never without its message. A running job whose cancel was asked for
        ends ``canceled`` instead of going back or running again (``Move.cancel_outlives``).

        Returns where it moved from and to. Raises ``Conflict`` when the move is not allowed,
        ``NotFound`` when there is no such job.
        """
        target = move.target
        ttl = (move.kept_s or self.ttl_s) if target.is_terminal() else 0
        values = {k: _encode(v) for k, v in move.fields.items()}
        now = repr(time.time())
        day = usage.day_of(float(now))  # the day a job that ends here is counted on
        event_type = _EVENT_FOR[target].value
        event_id, message = self._webhook_message(job_id, event_type, now)
        canceled: dict[str, str] = {}
        if move.cancel_outlives:
            canceled_id, canceled_message = self._webhook_message(job_id, EventType.CANCELED.value, now)
            canceled = {"event_id": canceled_id, "message": canceled_message, "ttl_s": str(self.ttl_s)}
        takeover: dict[str, str] = {}
        if move.takeover is not None:
            queued_id, queued_message = self._webhook_message(job_id, EventType.QUEUED.value, now)
            takeover = {"event_id": queued_id, "message": queued_message, "reason": move.takeover}
        requeue: list[str] = []
        if move.requeue is not None:
            if self.messages is None:
                raise ValueError(f"{move.name}: this store has no messages to requeue the job with")
            requeue = list(self.messages.run_job(job_id, move.requeue))
        dead_letter: list[str] = []
        if move.dead_letter is not None:
            entry = json.dumps(dict(move.dead_letter.entry))
            dead_letter = [self.keys.dead_letters, entry, str(move.dead_letter.max_entries)]
        keys = {
            "job": self.keys.job(job_id),
            "job_events": self.keys.job_events(job_id),
            "events": self.keys.events,
            "webhooks": WEBHOOK_QUEUE,
            "queued": self.keys.template(self.keys.queued),
            "waiting": self.keys.waiting,
            "running": self.keys.running,
            "sequence": self.keys.sequence,
            "in_flight": self.keys.template(self.keys.tenant_in_flight),
            "idempotency": self.keys.template(self.keys.idempotency),
            "finished": self.keys.metrics("finished"),
            "run_s": self.keys.metrics("run_s"),
            "usage": self.keys.template(partial(self.keys.usage, day)),
            "usage_month": self.keys.template(partial(self.keys.usage_month, usage.month_of(day))),
            "usage_tenants": self.keys.usage_tenants(day),
            "tenants": self.keys.metrics("tenants"),
        }
        args = _args(
            keys=keys,
            target=target.value,
            sources=",".join(s.value for s in move.sources),
            now=now,
            usage_expire_at=str(usage.expire_at(day, self.usage_retention_days)),
            no_tenant=NO_TENANT,
            event_type=event_type,
            maxlen=str(self.events_maxlen),
            ttl_s=str(ttl),
            count="attempt" if move.count_attempt else "",
            event_id=event_id,
            message=message,
            worker=move.owner or "",
            attempt="" if move.attempt is None else str(move.attempt),
            requeue=requeue,
            dead_letter=dead_letter,
            fields=_flatten(values),
            canceled=canceled,
            takeover=takeover,
        )
        ((ok, current, *reached),), held = self.replication.run(self.client, self._transition, [args])
        self.replication.warn_if_short(held, f"job {job_id} {move.name}")
        current = _text(current)
        if not current:
            raise NotFound(f"no job {job_id!r}")
        if not ok:
            reasons = [f"{move.owner} no longer has it"] if move.owner else []
            if move.attempt is not None:
                reasons.append(f"it is no longer at attempt {move.attempt}")
            owner = f" (or {', or '.join(reasons)})" if reasons else ""
            raise Conflict(f"job {job_id} is {current}; it cannot become {target.value}{owner}")
        return Moved(JobStatus(current), JobStatus(_text(reached[0])))

    def expire_queued(self, max_wait_s: float, batch: int = 100) -> list[str]:
        """Fail as ``expired`` every job that has been queued longer than ``max_wait_s``, found by
        the waiting index, whether or not a worker of its class exists. Each is one transition
        (its event and webhook, its tenant's in-flight slot freed), made only while the job is
        still queued: a job claimed or canceled meanwhile is left alone. Returns their ids.

        The job's message stays in its queue (removing it would mean searching the list for it):
        a worker that takes it finds the job failed and drops it."""
        expired: list[str] = []
        while True:
            expired_now = 0
            now = time.time()
            oldest = self.client.zrangebyscore(
                self.keys.waiting, "-inf", f"({now - max_wait_s!r}", start=0, num=batch, withscores=True
            )
            for member, created_at in oldest:
                job_id = _text(member)
                waited = (
                    f"waited {now - created_at:.0f} s in the queue, longer than the fleet's {max_wait_s} s"
                )
                try:
                    # created_at never changes, so the index's score is the record's: only the
                    # status can have moved since the read, and the transition checks it.
                    self.move(job_id, lifecycle.expire(JobError(type=ErrorType.EXPIRED, message=waited), now))
                except Conflict:
                    continue
                except NotFound:
                    self.client.zrem(self.keys.waiting, job_id)
                    continue
                expired.append(job_id)
                expired_now += 1
            # A full batch none of which could expire (a state the index should never hold)
            # must not loop for ever.
            if len(oldest) < batch or not expired_now:
                return expired

    def time_out_overdue(self, longest_s: float) -> list[str]:
        """Fail as ``time_limit`` every running job started longer than ``longest_s`` ago,
        whatever became of its worker: alive but unable to write its end (Redis refused it, read
        only or out of memory, longer than the worker's retries), or gone with nothing to hand
        it back. Each is one move, only while the job is still running at the attempt read, so a
        job that ends or moves meanwhile is left alone. Returns their ids."""
        ids = self.running()
        if not ids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), "started_at", "attempt")
            rows = pipe.execute()
        now = time.time()
        ended: list[str] = []
        for job_id, (started_at, attempt) in zip(ids, rows, strict=True):
            if not started_at or now - float(started_at) <= longest_s:
                continue
            ran = (
                f"running {now - float(started_at):.0f} s, past the fleet's {longest_s:g} s, and never ended"
            )
            error = JobError(type=ErrorType.TIME_LIMIT, message=ran)
            try:
                self.move(job_id, lifecycle.time_out(error, now, attempt=int(attempt or 0)))
            except (Conflict, NotFound):
                continue
            ended.append(job_id)
        return ended

    def page(
        self, tenant: str, limit: int, after: Cursor | None = None, order: str = "desc"
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` of the tenant's (job id, created_at), newest first (``order``
        ``"asc"``: oldest first), from just after ``after`` (None: from the first)."""
        args = _args(
            keys={"jobs": self.keys.tenant_jobs(tenant)},
            limit=str(limit),
            created_at=repr(after.created_at) if after else "",
            id=after.job_id if after else "",
            order=order,
        )
        flat = self._list_page(args=[args])
        return [(_text(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]

    def running(self) -> list[str]:
        """Ids of the jobs some worker is running (or was, when it died)."""
        return [_text(m) for m in self.client.smembers(self.keys.running)]

    def progress(
        self,
        job_id: str,
        step: int,
        total: int,
        drain_key: str = "",
        *,
        worker: str | None = None,
        attempt: int | None = None,
        stage: str = "",
    ) -> Step:
        """Record a finished step, and learn whether the job should stop: canceled (or no longer
        running), its worker is draining (``drain_key`` exists) and hands it back, or it runs
        now as another ``worker`` or ``attempt`` than the one reporting (nothing is written).
        ``stage``: what the steps count, '' for denoising steps (``JobRecord.stage``)."""
        now = repr(time.time())
        event_id, message = self._webhook_message(job_id, EventType.PROGRESS.value, now)
        keys = {
            "job": self.keys.job(job_id),
            "job_events": self.keys.job_events(job_id),
            "events": self.keys.events,
            "webhooks": WEBHOOK_QUEUE,
            "drain": drain_key,
        }
        args = _args(
            keys=keys,
            step=str(step),
            total=str(total),
            stage=stage,
            now=now,
            maxlen=str(self.events_maxlen),
            event_id=event_id,
            message=message,
            interval_s=str(self.progress_webhook_interval_s),
            worker=worker or "",
            attempt="" if attempt is None else str(attempt),
        )
        return _step(self._progress(args=[args]))

    def check(
        self, job_id: str, drain_key: str = "", *, worker: str | None = None, attempt: int | None = None
    ) -> Step:
        """What ``progress`` would say, writing nothing: whether the job should stop now."""
        keys = {"job": self.keys.job(job_id), "drain": drain_key}
        args = _args(keys=keys, worker=worker or "", attempt="" if attempt is None else str(attempt))
        return _step(self._check(args=[args]))

    def _webhook_message(self, job_id: str, event_type: str, now: str) -> tuple[str, str]:
        """An id for the event, and the delivery message the script queues if the job's webhook
        wants this event (built here because the script cannot build Celery messages)."""
        event_id = uuid.uuid4().hex
        if self.messages is None:
            return event_id, ""
        return event_id, self.messages.deliver_webhook(job_id, event_id, event_type, now)[1]

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job: a queued job becomes canceled at once and never runs (its message leaves
        its queue, and its record is kept ``canceled_ttl_s``); a running job is marked and stops
        at its next step. A finished job is left as it is. Returns the status after the call."""
        try:
            self.move(job_id, lifecycle.cancel(time.time(), kept_s=self.canceled_ttl_s))
            return JobStatus.CANCELED
        except Conflict:
            pass
        status = _text(self._request_cancel(args=[_args(keys={"job": self.keys.job(job_id)})]))
        if not status:
            raise NotFound(f"no job {job_id!r}")
        return JobStatus(status)

    def forget(self, job_id: str) -> None:
        """Delete an ended job's record, as its TTL would (its stored files are the caller's to
        delete first), and remember its id with its tenant and kind for ``deleted_ttl_s``.
        Raises NotFound for no such job and Conflict for one not ended."""
        keys = {
            "job": self.keys.job(job_id),
            "job_events": self.keys.job_events(job_id),
            "webhook_log": self.keys.webhook_log(job_id),
            "replays": self.keys.replays_of_job(job_id),
            "jobs": self.keys.template(self.keys.tenant_jobs),
            "idempotency": self.keys.template(self.keys.idempotency),
            "deleted": self.keys.deleted_job(job_id),
        }
        ended = ",".join(status.value for status in JobStatus if status.is_terminal())
        args = _args(keys=keys, id=job_id, ended=ended, remember_s=self.deleted_ttl_s)
        (reply,), held = self.replication.run(self.client, self._forget, [args])
        self.replication.warn_if_short(held, f"job {job_id} forgotten")
        outcome = _text(reply)
        if not outcome:
            raise NotFound(f"no job {job_id!r}")
        if outcome != "forgotten":
            raise Conflict(f"job {job_id} is {outcome}: only an ended job can be deleted")

    def deleted(self, job_id: str) -> Deleted | None:
        """Whose ``job_id`` was, and its kind, if it was deleted on request within
        ``deleted_ttl_s``, else None: a delete repeated meanwhile is answered as the first was."""
        kept = {_text(k): _text(v) for k, v in self.client.hgetall(self.keys.deleted_job(job_id)).items()}
        return Deleted(kept["tenant"], kept["kind"]) if kept else None

    def events(self, job_id: str | None = None, count: int = 10_000) -> list[dict[str, str]]:
        """Recent events, oldest first, optionally of one job (for tests and tools; webhooks
        read the stream with a consumer group)."""
        entries = self.client.xrange(self.keys.events, count=count)
        events = [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]
        return [e for e in events if job_id is None or e["job_id"] == job_id]


def _encode(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    raise TypeError(f"cannot store {type(value).__name__} in a job record")


def _args(**named: Any) -> str:
    """A script's one argument: its named fields as JSON (``routing.jobs.scripts``)."""
    return json.dumps(named, separators=(",", ":"), ensure_ascii=False)


def _step(reply: list[Any]) -> Step:
    status, cancel, drain, superseded = reply
    status = _text(status)
    return Step(
        JobStatus(status) if status else None, _text(cancel) == "1", int(drain) == 1, int(superseded) == 1
    )


def _flatten(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

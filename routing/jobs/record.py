"""What a job is, apart from where it is kept: its status and the moves allowed between them, its
record, its outputs, and the one JSON shape of a job that the API sends, the HTTP SDK parses and
webhooks carry (``JobView``).

Pure data: nothing here talks to Redis, Celery or HTTP. ``routing.jobs.store`` keeps records in
Redis; ``routing.jobs.lifecycle`` names every change a job can make.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from routing.errors import Conflict, JobError, JobNotSucceeded
from routing.jobs.events import Webhook
from routing.limits import RequestLimits


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# The only allowed state changes. running -> running is a redelivery (the worker that had the
# job died); running -> queued hands a job back (escalation to a bigger class).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


def allowed_sources(target: JobStatus) -> list[JobStatus]:
    """The states a job may reach ``target`` from."""
    return [source for source, targets in TRANSITIONS.items() if target in targets]


@dataclass(frozen=True)
class Output:
    """One file a job made: where it is stored, its type and size, what it shows, the seed it was
    made with, and (where outputs are handed out) a presigned url to fetch it."""

    key: str
    content_type: str
    size_bytes: int
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    frames: int | None = None  # videos only
    fps: int | None = None
    cache: str | None = None  # the step-caching method it was made with; None: uncached
    url: str | None = None

    def with_url(self, url: str) -> Output:
        return replace(self, url=url)


@dataclass(frozen=True)
class JobRecord:
    id: str
    model: str
    kind: str
    request: dict[str, Any]
    status: JobStatus
    queue: str
    attempt: int
    step: int
    total_steps: int
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    outputs: list[Output] = field(default_factory=list)
    error: JobError | None = None
    timings: dict[str, float] = field(default_factory=dict)
    worker: str | None = None
    cancel_requested: bool = False
    idempotency_key: str | None = None
    tenant: str = ""
    priority: str = "normal"
    webhook: Webhook | None = None
    # Moves to a bigger class after running out of memory: [{"from", "to", "at"}].
    escalations: list[dict[str, Any]] = field(default_factory=list)
    handed_back: str | None = None  # why the job last went back to its queue
    # What the request was accepted under: the worker checks it again under these, not its own
    # settings. None for a job stored before limits were kept.
    limits: RequestLimits | None = None
    # What ``step`` of ``total_steps`` counts: None for denoising steps, else a stage of the work
    # before them (``preprocess.<stage>``: Animate's preprocessing, in frames or videos).
    stage: str | None = None
    # The W3C traceparent of the submit's span (routing.tracing); None when it was not traced.
    traceparent: str | None = None

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> JobRecord:
        """A record from its stored fields (all strings, as a Redis hash holds them)."""

        def opt_float(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) else None

        return cls(
            id=raw["id"],
            model=raw["model"],
            kind=raw["kind"],
            request=json.loads(raw["request"]),
            status=JobStatus(raw["status"]),
            queue=raw["queue"],
            attempt=int(raw.get("attempt", 0)),
            step=int(raw.get("step", 0)),
            total_steps=int(raw.get("total_steps", 0)),
            created_at=float(raw["created_at"]),
            updated_at=float(raw["updated_at"]),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            outputs=[Output(**o) for o in json.loads(raw.get("outputs") or "[]")],
            error=JobError.from_dict(json.loads(raw["error"])) if raw.get("error") else None,
            timings=json.loads(raw.get("timings") or "{}"),
            worker=raw.get("worker") or None,
            cancel_requested=raw.get("cancel_requested") == "1",
            idempotency_key=raw.get("idempotency_key") or None,
            tenant=raw.get("tenant", ""),
            priority=raw.get("priority") or "normal",
            webhook=Webhook(raw["webhook_url"], tuple(raw["webhook_events"].split(",")))
            if raw.get("webhook_url")
            else None,
            escalations=json.loads(raw.get("escalations") or "[]"),
            handed_back=raw.get("handed_back") or None,
            limits=RequestLimits.from_json(raw["limits"]) if raw.get("limits") else None,
            stage=raw.get("stage") or None,
            traceparent=raw.get("traceparent") or None,
        )


@dataclass(frozen=True)
class JobView:
    """A job as the fleet shows it outside: the record less what only the fleet keeps (tenant,
    worker, idempotency key, escalations), plus its place in line, its ETA and the outputs'
    presigned URLs. ``to_json`` is the object the API sends and webhooks carry as ``data``;
    ``from_json`` reads it back (the HTTP SDK). ``created`` is no part of the JSON: it is false
    when a submit's idempotency key returned an earlier job (the API answers 200, not 201)."""

    id: str
    model: str
    kind: str
    status: JobStatus
    priority: str
    attempt: int
    step: int
    total_steps: int
    queue: str
    queue_position: int | None
    eta_s: float | None
    outputs: list[Output]
    error: JobError | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    timings: dict[str, float]
    webhook: Webhook | None
    request: dict[str, Any]
    stage: str | None = None
    created: bool = True

    @classmethod
    def of(
        cls,
        record: JobRecord,
        *,
        queue_position: int | None = None,
        eta_s: float | None = None,
        outputs: list[Output] | None = None,
    ) -> JobView:
        """The view of ``record``; ``outputs`` replaces the stored ones (with their URLs)."""
        return cls(
            id=record.id,
            model=record.model,
            kind=record.kind,
            status=record.status,
            priority=record.priority,
            attempt=record.attempt,
            step=record.step,
            total_steps=record.total_steps,
            queue=record.queue,
            queue_position=queue_position,
            eta_s=eta_s,
            outputs=list(record.outputs if outputs is None else outputs),
            error=record.error,
            created_at=record.created_at,
            updated_at=record.updated_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            timings=record.timings,
            webhook=record.webhook,
            request=record.request,
            stage=record.stage,
        )

    def to_json(self) -> dict[str, Any]:
        """The job's JSON object (plain dicts, lists, strings and numbers)."""
        return {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "status": self.status.value,
            "priority": self.priority,
            "attempt": self.attempt,
            "progress": {"step": self.step, "total": self.total_steps, "stage": self.stage},
            "queue": self.queue,
            "queue_position": self.queue_position,
            "eta_s": self.eta_s,
            "outputs": [asdict(o) for o in self.outputs],
            "error": asdict(self.error) | {"type": self.error.type.value} if self.error else None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "timings": self.timings,
            "webhook": {"url": self.webhook.url, "events": list(self.webhook.events)}
            if self.webhook
            else None,
            "request": self.request,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], created: bool = True) -> JobView:
        webhook = data.get("webhook")
        return cls(
            id=data["id"],
            model=data["model"],
            kind=data["kind"],
            status=JobStatus(data["status"]),
            priority=data["priority"],
            attempt=data["attempt"],
            step=data["progress"]["step"],
            total_steps=data["progress"]["total"],
            queue=data["queue"],
            queue_position=data.get("queue_position"),
            eta_s=data.get("eta_s"),
            outputs=[Output(**o) for o in data.get("outputs", [])],
            error=JobError.from_dict(data["error"]) if data["error"] else None,
            created_at=data["created_at"],
            updated_at=data["updated_at"],
            started_at=data["started_at"],
            finished_at=data["finished_at"],
            timings=data["timings"],
            webhook=Webhook(webhook["url"], tuple(webhook["events"])) if webhook else None,
            request=data["request"],
            stage=data["progress"].get("stage"),
            created=created,
        )

    def result(self) -> list[Output]:
        """The outputs; raises ``JobNotSucceeded`` (failed, canceled) or ``Conflict`` (not ended)."""
        if self.status in (JobStatus.FAILED, JobStatus.CANCELED):
            reason = self.error.message if self.error else ""
            raise JobNotSucceeded(self, f"job {self.id} {self.status.value}: {reason}".rstrip(": "))
        if self.status is not JobStatus.SUCCEEDED:
            raise Conflict(f"job {self.id} is {self.status.value}; it has no result yet")
        return self.outputs

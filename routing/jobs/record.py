"""What a job is, without the store it lives in: its status and the allowed changes, its
record, and the outputs it made. Pure data (no Redis, no Celery), so the HTTP SDK can parse a job
without loading the job store."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from routing.errors import JobError
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

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> JobRecord:
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
        )

"""Every change a job's state can make, by name. Each is a ``Move``: the state it goes to, the
states it may come from (within ``routing.jobs.record.TRANSITIONS``), the fence that keeps a stale
worker or attempt out, and what it writes besides. ``JobStore.move`` makes it as one Lua step
(``routing.jobs.scripts.TRANSITION``): record, indexes, event and webhook together or not at all.

    claim       queued/running -> running    a worker takes the job (running -> running: a
                                             redelivery of a job whose worker died)
    progress    running                      a step is done (``JobStore.progress``: no state change)
    finish      running -> succeeded/failed/canceled   by the worker and attempt that own it
    hand_back   running -> queued            the worker stops (shutdown, or the reaper: it died)
    escalate    running -> queued            out of GPU memory: to the next bigger class's queue
    give_up     queued/running -> failed     too many attempts; dead-lettered in the same step
    expire      queued -> failed             waited longer than the fleet's max_wait_s
    cancel      queued -> canceled           (a running job's cancel is a request: ``JobStore.cancel``)
    time_out    running -> failed            the hard time limit killed the worker's child

A running job whose cancel was asked for never goes back to its queue nor runs again: a
hand-back, an escalation or a redelivery of it ends it ``canceled`` instead, and so does a give-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from routing.errors import JobError
from routing.jobs.record import JobRecord, JobStatus, Output, allowed_sources

_RUNNING = (JobStatus.RUNNING,)


@dataclass(frozen=True)
class DeadLetter:
    entry: Mapping[str, Any]  # what the dead-letter list keeps of the job
    max_entries: int  # the list is trimmed to its newest max_entries


@dataclass(frozen=True)
class Move:
    name: str
    target: JobStatus
    sources: tuple[JobStatus, ...]
    owner: str | None = None  # only while this worker holds the job
    attempt: int | None = None  # only while the job is at this attempt
    count_attempt: bool = False
    requeue: str | None = None  # the queue whose message is pushed as the job goes back
    cancel_wins: bool = False  # a job whose cancel was asked for ends canceled instead
    dead_letter: DeadLetter | None = None  # written when the job ends failed
    kept_s: int | None = None  # how long a record that ends here is kept; the store's TTL when None
    fields: Mapping[str, Any] = field(default_factory=dict)
    # A claim of a job its dead worker left running: why it went back. Made from ``running``, the
    # claim also records the hand-back and its ``job.queued`` event, in the same step, as the
    # reaper's hand-back does (a reaper and a redelivered message race for such a job: whichever
    # wins, the record and the events say the same).
    takeover: str | None = None

    def __post_init__(self) -> None:
        allowed = allowed_sources(self.target)
        if not self.sources or any(s not in allowed for s in self.sources):
            raise ValueError(f"{self.name}: {self.target.value} cannot be reached from {self.sources}")

    @property
    def cancel_outlives(self) -> bool:
        """Whether a running job's asked-for cancel turns this move into ``canceled``: any move
        that would let it run again, and the ones that say so."""
        return (self.cancel_wins or not self.target.is_terminal()) and JobStatus.RUNNING in self.sources


@dataclass(frozen=True)
class Moved:
    """What a move did: the state the job left, and the one it reached (``CANCELED`` instead of
    the target when a cancel was asked for while it ran)."""

    source: JobStatus
    target: JobStatus


def claim(record: JobRecord, worker: str, started_at: float) -> Move:
    """``worker`` takes the job as it read it: only if it is still at that attempt and, when it
    was running (its worker died), still that worker's. Counts an attempt."""
    running = record.status is JobStatus.RUNNING
    return Move(
        "claim",
        JobStatus.RUNNING,
        (JobStatus.QUEUED, JobStatus.RUNNING),
        owner=record.worker if running else None,
        attempt=record.attempt,
        count_attempt=True,
        fields={"started_at": started_at, "worker": worker, "cancel_requested": 0},
        takeover=f"worker {record.worker} died" if running and record.worker else None,
    )


def finish(
    status: JobStatus,
    *,
    owner: str | None,
    attempt: int | None,
    finished_at: float,
    timings: Mapping[str, float] | None = None,
    outputs: list[Output] | None = None,
    error: JobError | None = None,
) -> Move:
    """The running job ends ``status``, written only by the worker and attempt that own it (a job
    handed on meanwhile belongs to another, whose outcome counts)."""
    if not status.is_terminal():
        raise ValueError(f"finish: {status.value} is not an end")
    fields: dict[str, Any] = {"finished_at": finished_at}
    if timings is not None:
        fields["timings"] = dict(timings)
    if outputs is not None:
        fields["outputs"] = outputs
    if error is not None:
        fields["error"] = error
    elif status is JobStatus.SUCCEEDED:
        fields["error"] = None  # an escalated job's out-of-memory error is history now
    return Move("finish", status, _RUNNING, owner=owner, attempt=attempt, fields=fields)


def hand_back(queue: str, reason: str, *, owner: str, attempt: int | None = None) -> Move:
    """``owner`` gives the running job back to ``queue`` (its own), saying why."""
    return Move(
        "hand back",
        JobStatus.QUEUED,
        _RUNNING,
        owner=owner,
        attempt=attempt,
        requeue=queue,
        fields={"handed_back": reason},
    )


def escalate(
    queue: str, escalations: list[dict[str, Any]], error: JobError, *, owner: str, attempt: int
) -> Move:
    """Out of memory: the job goes to ``queue`` (a bigger class), its ``escalations`` and the
    error kept on the record."""
    return Move(
        "escalate",
        JobStatus.QUEUED,
        _RUNNING,
        owner=owner,
        attempt=attempt,
        requeue=queue,
        fields={"queue": queue, "escalations": escalations, "error": error},
    )


def give_up(error: JobError, finished_at: float, dead_letter: DeadLetter) -> Move:
    """Fail the job (its workers died or stopped on every attempt) and dead-letter it."""
    return Move(
        "give up",
        JobStatus.FAILED,
        tuple(allowed_sources(JobStatus.FAILED)),
        cancel_wins=True,
        dead_letter=dead_letter,
        fields={"finished_at": finished_at, "error": error},
    )


def expire(error: JobError, finished_at: float) -> Move:
    """Fail a job still queued after the fleet's longest wait."""
    return Move(
        "expire", JobStatus.FAILED, (JobStatus.QUEUED,), fields={"finished_at": finished_at, "error": error}
    )


def cancel(finished_at: float, kept_s: int | None = None) -> Move:
    """Cancel a queued job: it never runs (its message leaves its queue in the same step), and
    its record is kept ``kept_s``."""
    return Move(
        "cancel", JobStatus.CANCELED, (JobStatus.QUEUED,), kept_s=kept_s, fields={"finished_at": finished_at}
    )


def time_out(error: JobError, finished_at: float, attempt: int | None = None) -> Move:
    """The running job ends ``time_limit``: the hard time limit killed the process running it (it
    cannot record its own end), or a sweep found it running past the fleet's longest run (only at
    ``attempt``, the one the sweep read)."""
    return Move(
        "time out",
        JobStatus.FAILED,
        _RUNNING,
        attempt=attempt,
        fields={"finished_at": finished_at, "error": error},
    )

"""Errors a backend can branch on.

FleetError
├── InvalidRequest     the request was refused before anything was queued (``errors`` names fields)
├── Unauthorized       no API key, or an unknown one (the HTTP SDK: a 401)
├── NotFound           no such job (or not yours)
├── Conflict           the idempotency key was used with another request, or a state change
│                      is not allowed from the job's current state
├── TooManyJobs        the tenant has as many unfinished jobs as it may; nothing was queued
├── OverBudget         the tenant's jobs this UTC month have used its GPU budget; nothing was queued
├── Unavailable        the broker or the job store could not be reached; nothing was accepted
│   └── NotReplicated  the job store's master took the submit, but too few replicas confirmed
│                      it in time; submit again with the same idempotency key
├── JobNotSucceeded    asked for the result of a job that failed or was canceled
└── WaitTimeout        a wait ran out of time (the job goes on)

Every error a caller of the fleet (either SDK, the API's handlers, the CLIs) can branch on is here.

A failed job is not an exception but a result: its record holds a ``JobError`` whose ``type``
(an ``ErrorType``) says what a caller can do about it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class FleetError(Exception):
    """Base of every error the fleet raises to its callers."""


@dataclass(frozen=True)
class FieldError:
    field: str  # dotted path into the request, e.g. "width" or "images.1"
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidRequest(FleetError):
    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("invalid request: " + "; ".join(str(e) for e in errors))

    @property
    def fields(self) -> list[str]:
        return [e.field for e in self.errors]


class Unauthorized(FleetError):
    """The API key is missing or unknown."""


class NotFound(FleetError):
    pass


class Conflict(FleetError):
    pass


class Unavailable(FleetError):
    pass


class NotReplicated(Unavailable):
    """The master took the jobs in ``outcomes`` (the store's answer per job), but fewer replicas
    than ``FLEET_REDIS_MIN_REPLICAS`` confirmed them in time: a failover now would lose them. A
    submit made again with the same idempotency key answers the job if it lives on."""

    def __init__(self, message: str, outcomes: list | None = None):
        self.outcomes = outcomes or []
        super().__init__(message)


class TooManyJobs(FleetError):
    """Nothing of the refused submits was queued; ``accepted`` lists jobs of the same batch
    that were (a batch is accepted job by job)."""

    def __init__(self, message: str, accepted: list | None = None):
        self.accepted = accepted or []
        super().__init__(message)


class OverBudget(FleetError):
    """The tenant's jobs that ended this UTC month used its GPU-seconds budget
    (``gpu_s_per_month`` in ``FLEET_TENANTS``); no new job was queued. ``retry_at``: when the
    next month starts (Unix seconds), or None where the HTTP answer did not say."""

    def __init__(self, message: str, retry_at: float | None = None):
        self.retry_at = retry_at
        super().__init__(message)

    def retry_after_s(self) -> int:
        """Whole seconds until ``retry_at``, at least 1: an HTTP ``Retry-After``."""
        return max(1, math.ceil((self.retry_at or 0) - time.time()))


class JobNotSucceeded(FleetError):
    """``result()`` of a job that failed or was canceled; ``record`` says why."""

    def __init__(self, record: object, message: str):
        self.record = record
        super().__init__(message)


class WaitTimeout(FleetError):
    """``wait()`` ran out of time; the job goes on."""


class ErrorType(StrEnum):
    """Why a job failed: every type the fleet records in a job's ``error``."""

    INVALID_REQUEST = "invalid_request"  # the stored request no longer passes the checks the worker makes
    MODEL_ERROR = "model_error"  # the pipeline raised while generating
    OUT_OF_MEMORY = "out_of_memory"  # out of GPU memory, and no bigger class to escalate to
    TIME_LIMIT = "time_limit"  # ran past the task's soft or hard time limit
    EXPIRED = "expired"  # waited in its queue longer than the fleet's max_wait_s
    TOO_MANY_ATTEMPTS = "too_many_attempts"  # its worker died or stopped on every attempt (dead-lettered)
    GROUP_ERROR = "group_error"  # the GPU group running it died
    NO_PERSON_FOUND = "no_person_found"  # animate's preprocessing found no person in its input


@dataclass(frozen=True, kw_only=True)
class JobError:
    """What a failed job's record says about why; stored and served as this JSON object."""

    type: ErrorType
    exception: str = ""  # the raised exception's class name, when one was raised
    message: str
    where: str = ""  # the exception as Python prints it (first 500 characters)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobError:
        """Parse a stored error; a ``type`` outside ``ErrorType`` raises ``ValueError``."""
        return cls(
            type=ErrorType(raw["type"]),
            exception=raw.get("exception", ""),
            message=raw["message"],
            where=raw.get("where", ""),
        )


# Where FastAPI says an invalid value came from: the first part of its error locations.
_HTTP_LOCATIONS = ("body", "header", "query", "path")


def field_error(error: Mapping[str, Any], kinds: Collection[str] = ()) -> FieldError:
    """One pydantic validation error as a ``FieldError`` naming the request field.

    ``kinds`` are the tags of a union of request schemas picked by ``kind`` (the HTTP API's
    body): a tag is dropped from the location, and a missing or unknown one is an error of
    ``kind``. FastAPI's location part (``body``, ``query``, ...) is dropped too.
    """
    loc = [str(part) for part in error["loc"]]
    if loc and loc[0] in _HTTP_LOCATIONS:
        loc = loc[1:]
    if loc and loc[0] in kinds:
        loc = loc[1:]
    if loc[:1] == ["cache"] and len(loc) > 2:
        del loc[1]  # the union's tag (the method), already named by cache.method
    field = ".".join(loc) or "request"
    if error["type"] == "union_tag_invalid" and loc:
        # A nested union (``cache``) with a tag the fleet does not know: name its tag field.
        ctx = error["ctx"]
        tag_field = ctx["discriminator"].strip("'")
        return FieldError(f"{field}.{tag_field}", f"unknown {ctx['tag']!r}; known: {ctx['expected_tags']}")
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        return FieldError("kind", f"required, one of: {', '.join(sorted(kinds))}")
    if error["type"] == "extra_forbidden":
        return FieldError(field, "unknown field")
    if error["type"] == "animate_form":
        # Name the first field at fault rather than the request as a whole.
        return FieldError(error["ctx"]["field"], error["msg"])
    return FieldError(field, error["msg"].removeprefix("Value error, "))

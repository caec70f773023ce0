"""What backends touch: the Python SDKs (``Client`` over Redis, ``producer.http`` over the API) and
the command line (``python -m producer``).

``Client`` and ``Job`` load the Redis SDK (redis, Celery, boto3, PyAV, Pillow) on first use, so
that ``import producer.http`` on a backend that only has an API key loads none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from routing.classes import Priority
from routing.errors import (
    Conflict,
    FieldError,
    FleetError,
    InvalidRequest,
    JobNotSucceeded,
    NotFound,
    OverBudget,
    TooManyJobs,
    Unavailable,
    WaitTimeout,
)
from routing.jobs.events import WEBHOOK_EVENTS, Webhook, WebhookEvent
from routing.jobs.record import JobRecord, JobStatus, Output

if TYPE_CHECKING:
    from producer.client import Client, Job

__all__ = [
    "WEBHOOK_EVENTS",
    "Client",
    "Conflict",
    "FieldError",
    "FleetError",
    "InvalidRequest",
    "Job",
    "JobNotSucceeded",
    "JobRecord",
    "JobStatus",
    "NotFound",
    "OverBudget",
    "Output",
    "Priority",
    "TooManyJobs",
    "Unavailable",
    "WaitTimeout",
    "Webhook",
    "WebhookEvent",
]

_REDIS_SDK = ("Client", "Job")


def __getattr__(name: str) -> Any:
    if name in _REDIS_SDK:
        from producer import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

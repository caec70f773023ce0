"""What backends touch: the Python SDK (``Client``) and the command line (``python -m producer``)."""

from producer.client import Client, Job
from routing.classes import Priority
from routing.errors import (
    Conflict,
    FieldError,
    FleetError,
    InvalidRequest,
    JobNotSucceeded,
    NotFound,
    TooManyJobs,
    Unavailable,
    WaitTimeout,
)
from routing.jobs.events import WEBHOOK_EVENTS, Webhook, WebhookEvent
from routing.jobs.record import JobRecord, JobStatus, Output

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
    "Output",
    "Priority",
    "TooManyJobs",
    "Unavailable",
    "WaitTimeout",
    "Webhook",
    "WebhookEvent",
]

"""What backends touch: the Python SDK (``Client``) and the command line (``python -m producer``)."""

from producer.client import Client, Job, OutputFile
from routing.errors import (
    Conflict,
    FieldError,
    FleetError,
    InvalidRequest,
    JobNotSucceeded,
    NotFound,
    Unavailable,
    WaitTimeout,
)
from routing.jobs.store import JobRecord, JobStatus

__all__ = [
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
    "OutputFile",
    "Unavailable",
    "WaitTimeout",
]

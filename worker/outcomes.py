"""What Flower shows for a job's Celery task: the job's outcome, told once its record says so.

Celery would end every job's task SUCCESS: the task returns whatever became of the job, and it
returns before the finisher has stored and recorded it. So the task ends with ``Ignore`` (its
message is acknowledged as usual, and Celery sends no outcome event of its own), and this
process sends the event of the job's real outcome after its record is written:

    succeeded                    task-succeeded    SUCCESS
    failed (any error type)      task-failed       FAILURE, exception "<error type>: <message>"
    canceled                     task-revoked      REVOKED
    handed back, escalated       task-retried      RETRY (it runs again from its queue)

Flower builds task states from these events, the ``task-received`` and ``task-started`` Celery
sends from the worker's main process, and its state order (a final state wins over STARTED
whichever arrives first). No result is stored: the fleet has no result backend, and nothing would
read one (a job's outcome is its record).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from routing.jobs.record import JobStatus

log = logging.getLogger(__name__)


class TaskOutcomes:
    def __init__(self, app: Celery):
        self.app = app
        self.hostname = ""  # the Celery worker's node name (gpu16@host), from the first task
        self._lock = threading.Lock()  # the finisher's thread and the task's both report
        self._dispatcher: Any = None

    def report(self, job_id: str, status: JobStatus, error: dict[str, str] | None) -> None:
        detail = f"{error.get('type', '')}: {error.get('message', '')}" if error else ""
        with self._lock:
            if status is JobStatus.SUCCEEDED:
                self._send("task-succeeded", uuid=job_id, result=repr(status.value), runtime=None)
            elif status is JobStatus.FAILED:
                self._send(
                    "task-failed", uuid=job_id, exception=detail, traceback=(error or {}).get("where", "")
                )
            elif status is JobStatus.CANCELED:
                self._send("task-revoked", uuid=job_id, terminated=False, signum=None, expired=False)
            else:
                self._send("task-retried", uuid=job_id, exception=detail, traceback="")

    def _send(self, event_type: str, **fields: Any) -> None:
        if self._dispatcher is None:
            self._dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(), hostname=self.hostname, enabled=True
            )
        self._dispatcher.send(event_type, **fields)

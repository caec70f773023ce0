"""The Celery message that runs a job, ready to push onto its Redis queue.

The producer does not publish through ``send_task``: it writes the job record, its event and the
queue message in one Lua script (``JobStore.create``), so a job is accepted exactly when all
three exist, and a submit costs one round trip to Redis. The message is the one Celery itself
builds (``app.amqp.as_task_v2``, task protocol 2), wrapped in the envelope Kombu's Redis
transport reads; the integration tests run it through real workers.
"""

from __future__ import annotations

import base64
import json
import uuid

from celery import Celery
from kombu.utils.json import dumps as kombu_dumps

from routing.celery_config import RUN_JOB_TASK


class RunJobMessages:
    """Builds the messages for one Celery app.

    Celery's builder runs once, for a template; each job then changes only the fields that
    carry its id. That keeps a submit cheap (the builder's argument reprs cost more than the
    rest of a submit together) while the message stays Celery's own.
    """

    _PER_JOB_HEADERS = ("id", "root_id", "argsrepr")

    def __init__(self, app: Celery):
        template = app.amqp.as_task_v2("-", RUN_JOB_TASK, args=["-"], kwargs={})
        self._headers = dict(template.headers)
        self._properties = dict(template.properties)
        self._embed = template.body[2]

    def build(self, job_id: str, queue: str) -> tuple[str, str]:
        """(Redis list key, payload) of the message that asks a worker on ``queue`` to run
        ``job_id``. The Celery task id is the job id, so Flower and the job record name the same
        thing."""
        headers = {**self._headers, "id": job_id, "root_id": job_id, "argsrepr": repr([job_id])}
        body = kombu_dumps([[job_id], {}, self._embed])
        envelope = {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **self._properties,
                "correlation_id": job_id,
                "delivery_mode": 2,
                # The anonymous exchange: the routing key is the queue itself.
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return queue, json.dumps(envelope, separators=(",", ":"))

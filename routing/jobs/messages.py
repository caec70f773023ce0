"""The Celery message that runs a job, ready to push onto its Redis queue.

The producer does not publish through ``send_task``: it writes the job record, its event and the
queue message in one Lua script (``JobStore.create``), so a job is accepted exactly when all
three exist, and a submit costs one round trip to Redis. The message is the one Celery itself
builds (``app.amqp.as_task_v2``, task protocol 2), wrapped in the envelope Kombu's Redis
transport reads; the integration tests run it through real workers. ``task_id`` and
``task_args`` read a queued message back (a worker peeking at its queues, tests).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from typing import Any

from celery import Celery
from kombu.utils.json import dumps as kombu_dumps

from routing.celery_config import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK
from routing.classes import WEBHOOK_QUEUE


class TaskMessages:
    """Builds Celery task messages for one app without going through ``send_task``.

    Celery's builder runs once per task name, for a template; each message then changes only the
    fields that carry its id and arguments. That keeps a submit cheap (the builder's argument
    reprs cost more than the rest of a submit together) while the message stays Celery's own.
    """

    def __init__(self, app: Celery):
        self._app = app
        self._templates: dict[str, tuple[dict, dict, dict]] = {}

    def _template(self, task_name: str) -> tuple[dict, dict, dict]:
        if task_name not in self._templates:
            template = self._app.amqp.as_task_v2("-", task_name, args=["-"], kwargs={})
            self._templates[task_name] = (dict(template.headers), dict(template.properties), template.body[2])
        return self._templates[task_name]

    def build(self, task_name: str, args: list, queue: str, task_id: str) -> tuple[str, str]:
        """(Redis list key, payload) of a message asking a worker on ``queue`` to run
        ``task_name(*args)`` as task ``task_id``."""
        headers, properties, embed = self._template(task_name)
        headers = {**headers, "id": task_id, "root_id": task_id, "argsrepr": repr(args)}
        body = kombu_dumps([args, {}, embed])
        envelope = {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties,
                "correlation_id": task_id,
                "delivery_mode": 2,
                # The anonymous exchange: the routing key is the queue itself. Priority lives in
                # the queue name (routing.classes.queue_name), not in Kombu's priority lists.
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return queue, json.dumps(envelope, separators=(",", ":"))

    def run_job(self, job_id: str, queue: str) -> tuple[str, str]:
        """The message that runs ``job_id``; its Celery task id is the job id, so Flower and the
        job record name the same thing."""
        return self.build(RUN_JOB_TASK, [job_id], queue, job_id)

    def deliver_webhook(
        self, job_id: str, event_id: str, event_type: str, at: str, delivery_id: str | None = None
    ) -> tuple[str, str]:
        """The message that delivers one event; its Celery task id (the event id unless given)
        names the delivery, whose attempts are claimed by number: a replay needs an id of its own."""
        args = [job_id, event_id, event_type, at]
        return self.build(DELIVER_WEBHOOK_TASK, args, WEBHOOK_QUEUE, delivery_id or event_id)


def _envelope(payload: str | bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(payload, Mapping):  # already decoded (Kombu keeps unacked ones in a tuple)
        envelope: Any = payload
    else:
        try:
            envelope = json.loads(payload)
        except ValueError:
            raise ValueError("not a task message: not JSON") from None
    if not isinstance(envelope, Mapping) or not isinstance(envelope.get("headers"), Mapping):
        raise ValueError("not a task message: no headers")
    return envelope


def task_id(payload: str | bytes | Mapping[str, Any]) -> str:
    """The Celery task id of a queued message (``build``'s ``task_id``: for a job, its id).
    Raises ``ValueError`` for anything that is not a task message."""
    found = _envelope(payload)["headers"].get("id")
    if not isinstance(found, str) or not found:
        raise ValueError("not a task message: no task id")
    return found


def task_args(payload: str | bytes | Mapping[str, Any]) -> list[Any]:
    """The positional arguments of a queued message (``build``'s ``args``). Raises
    ``ValueError`` for anything that is not a task message ``build`` could have made."""
    envelope = _envelope(payload)
    try:
        body = json.loads(base64.b64decode(envelope["body"], validate=True))
    except (KeyError, TypeError, ValueError):
        raise ValueError("not a task message: no base64 JSON body") from None
    if not isinstance(body, list) or len(body) != 3 or not isinstance(body[0], list):
        raise ValueError("not a task message: its body is not [args, kwargs, embed]")
    return body[0]

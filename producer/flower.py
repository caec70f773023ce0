"""Flower, the Celery monitor, on the fleet's broker: ``celery -A producer.flower flower``.

What it runs: Flower 2.x against the fleet's Redis, so operators see every GPU worker
(``gpu16@host``, ...), every job as a Celery task (the task id is the job id), and the length of
every fleet queue. The workers send task events (``routing.celery_config``); Flower listens to
them and asks the workers for their queues and stats.

Why ``-A producer.flower``: with a Redis broker Flower reads queue lengths straight from Redis
(``LLEN``; its ``--broker_api`` flag is for RabbitMQ's management API only and is ignored for
Redis). It asks for the queues the live workers consume, and when it knows of no worker, for the
queues its Celery app declares. Bare ``celery flower`` declares only ``celery``, a queue the
fleet never uses; the app here (``app`` below) declares every queue of every class
(``gpu16.high`` ... ``h100x8.low``) and ``webhooks``, and takes the broker from the fleet's
settings (``FLEET_REDIS_URL``), so no broker URL, and no Redis password, is on the command line.

Why basic auth: Flower's HTTP API can do more than look. It can send any task to the fleet with
any arguments (``/api/task/send-task``), revoke jobs and shut workers down, all past the tenant
keys, validation and limits of the fleet's API. Without credentials Flower 2.x refuses its API
and serves its pages to anyone; with ``--basic-auth`` every page and API call needs the user and
password (answered with 401 otherwise) except ``/healthcheck``. The credentials go in
``FLOWER_BASIC_AUTH`` (``user:password``), which Flower reads from its environment, so that
they are not in the process list either. Loading the app below fails, and so Flower does not
start, while ``FLOWER_BASIC_AUTH`` is unset or names an empty user or password (compose's
``${FLOWER_USER}:${FLOWER_PASSWORD}`` with both unset is ``:``).

This module only builds the Celery app Flower shows: compose and Kubernetes run the command
above under their own supervisor with ``FLOWER_BASIC_AUTH`` in the environment, and
``localfleet.flower.FlowerProcess`` starts it as a child process (the demo, the tests).
"""

from __future__ import annotations

import os
from typing import Any

from routing.settings import Settings


def fleet_queue_names() -> list[str]:
    """Every queue of the fleet: each class's, highest priority first, then webhooks."""
    from routing.classes import WEBHOOK_QUEUE, VramClass, class_queues

    return [q for c in VramClass for q in class_queues(c)] + [WEBHOOK_QUEUE]


def make_flower_celery(settings: Settings) -> Any:
    """The Celery app Flower runs with: the fleet's broker and settings, every fleet queue."""
    from kombu import Queue

    from routing.celery_config import make_celery

    app = make_celery(settings)
    app.conf.task_queues = [Queue(name, routing_key=name) for name in fleet_queue_names()]
    return app


def check_basic_auth(value: str | None) -> None:
    """Raise unless ``value`` (``FLOWER_BASIC_AUTH``) names at least one user, each with a user
    name and a password."""
    pairs = [pair.partition(":") for pair in (value or "").split(",")]
    if not value or any(not user or not sep or not password for user, sep, password in pairs):
        raise RuntimeError(
            "Flower refuses to start without credentials: set FLOWER_BASIC_AUTH to user:password "
            "(compose and Kubernetes build it from FLOWER_USER and FLOWER_PASSWORD; neither may be "
            "empty). Its API can send tasks to the GPU queues and shut workers down."
        )


def __getattr__(name: str) -> Any:
    # ``celery -A producer.flower`` looks up ``app``: built on first access, from FLEET_*.
    if name == "app":
        from routing.settings import get_settings

        check_basic_auth(os.environ.get("FLOWER_BASIC_AUTH"))
        from producer.flower_sentinel import read_queues_through_every_sentinel

        settings = get_settings()
        read_queues_through_every_sentinel(settings)
        globals()["app"] = make_flower_celery(settings)
        return globals()["app"]
    raise AttributeError(name)

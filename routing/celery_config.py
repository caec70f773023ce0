"""The Celery app both sides build: the producer to send, the worker to consume.

Settings for long GPU tasks on a Redis broker:

- JSON only, both ways: a message can never carry code (pickle is refused at the door).
- Late acknowledgement with rejection on worker loss: a job's message is acknowledged only once
  its pipeline call is over, so a worker that dies mid-generation hands it back instead of losing
  it. Encoding, storing and recording then run on the worker's finisher thread, where the job
  record (``running``, owned by that worker) keeps the job: if the worker dies, the reaper hands
  it back (``worker.finisher``).
- Prefetch 1: a worker holds no job it is not running; the next one stays in Redis where any
  other free worker can take it.
- A short visibility timeout (``visibility_timeout_s``, 10 minutes), not one above the longest
  wait plus run. Kombu hands an unacknowledged message to another worker after it; for a job still
  running, the claim check (``JobRunner._claim``: the job's worker is alive) drops that copy, so
  nothing runs twice. A message a worker died holding before it claimed the job (its pool child
  was still loading models) does not wait for it: the reaper gives it back at once
  (``worker.held``). Webhook deliveries
  wait out their retry countdowns unacknowledged, so their queue keeps its own, long timeout under
  its own Kombu keys (``webhook_visibility_timeout_s``, above the longest countdown plus a POST).
- No result backend: a job's outcome is its record, and Flower takes task states from events;
  a result stored per task would only fill Redis.
- Queue order "priority": a worker polls its queues in the order it lists them (its own class
  first, see ``routing.classes.consumed_queues``) instead of Kombu's default round robin.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from routing.classes import WEBHOOK_QUEUE, VramClass, consumed_queues
from routing.io.connection import broker_tls, broker_transport_options, broker_url
from routing.settings import Settings

RUN_JOB_TASK = "fleet.run_job"
# Where Kombu's Redis transport keeps the messages the GPU workers took and have not acknowledged:
# delivery tag -> [message, exchange, routing key], and delivery tag -> when it was taken. Named
# here (they are Kombu's defaults) because the reaper gives back a dead worker's (worker.held).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
DELIVER_WEBHOOK_TASK = "fleet.deliver_webhook"


def celery_settings(settings: Settings) -> dict[str, object]:
    visibility_timeout_s = settings.visibility_timeout_s
    return {
        # The one Redis, or the master the Sentinels name (Kombu's sentinel:// transport).
        "broker_url": broker_url(settings),
        # No task result is kept: nothing reads one. A job's outcome is its record; Flower
        # builds task states from events (worker/outcomes.py).
        "result_backend": "disabled",
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.max_run_s,
        "task_soft_time_limit": max(settings.max_run_s - 60, 1),
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout_s,
            "queue_order_strategy": "priority",
            "unacked_key": UNACKED_KEY,
            "unacked_index_key": UNACKED_INDEX_KEY,
            **broker_transport_options(settings),
        },
        # The TLS options of a rediss:// URL (ssl_cert_reqs, ssl_ca_certs...), said here too:
        # Flower reads them only from here, a worker that names its transport (worker.held)
        # loses the ones Kombu takes from the URL's scheme, and Kombu would not check the server
        # where the URL does not say so.
        "broker_use_ssl": broker_tls(settings),
        "broker_connection_retry_on_startup": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": VramClass.GPU16.queue,
    }


def make_celery(settings: Settings, vram_class: VramClass | None = None) -> Celery:
    """A Celery app for ``settings``; for a worker, ``vram_class`` declares the queues it consumes
    in the order it prefers them."""
    app = Celery("fleet", set_as_current=False)
    app.conf.update(celery_settings(settings))
    if vram_class is not None:
        app.conf.task_queues = [Queue(name, routing_key=name) for name in consumed_queues(vram_class)]
    app.conf.task_routes = {DELIVER_WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE}}
    return app


def webhook_transport_options(settings: Settings) -> dict[str, object]:
    """Broker options of the webhook workers: their own unacknowledged-message keys, so GPU
    workers' short-timeout sweeps never return a delivery waiting out its retry countdown, and
    their own timeout, above the longest countdown plus a POST (``Settings`` checks that)."""
    return {
        "visibility_timeout": settings.webhook_visibility_timeout_s,
        "unacked_key": "webhooks_unacked",
        "unacked_index_key": "webhooks_unacked_index",
        "unacked_mutex_key": "webhooks_unacked_mutex",
    }

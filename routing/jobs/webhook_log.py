"""What both the webhook worker and the HTTP API read and change: a job's delivery log, the
endpoints a 410 disabled, and replays of an event (same webhook-id, so receivers dedupe it)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from routing.jobs.keys import Keys
from routing.jobs.messages import TaskMessages


def delivery_log(client: redis.Redis, keys: Keys, job_id: str) -> list[dict[str, Any]]:
    """Every logged delivery attempt of the job's events, oldest first."""
    return [json.loads(raw) for raw in client.lrange(keys.webhook_log(job_id), 0, -1)]


def replay(
    messages: TaskMessages,
    client: redis.Redis,
    job_id: str,
    event_id: str,
    event_type: str,
    at: str | None = None,
) -> None:
    """Queue a new delivery of an event, with the same webhook-id (receivers dedupe by it).

    ``at`` is the event's time (``event_at`` of its log entries); now when not given.
    """
    queue, payload = messages.deliver_webhook(job_id, event_id, event_type, at or repr(time.time()))
    client.lpush(queue, payload)


def disabled_urls(client: redis.Redis, keys: Keys, tenant: str) -> set[str]:
    return {u.decode() for u in client.smembers(keys.webhooks_disabled(tenant))}


def enable_url(client: redis.Redis, keys: Keys, tenant: str, url: str) -> bool:
    """Deliver to ``url`` again after a 410 disabled it; False if it was not disabled."""
    return bool(client.srem(keys.webhooks_disabled(tenant), url))

"""What both the webhook worker and the HTTP API read and change: a job's delivery log, the
endpoints a 410 disabled, and replays of an event (same webhook-id, so receivers dedupe it)."""

from __future__ import annotations

import json
import time
import uuid
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

    ``at`` is the event's time (``event_at`` of its log entries); now when not given. The replay
    is a delivery of its own (a new task id), so its attempts are not taken for the first's.
    """
    at = at or repr(time.time())
    queue, payload = messages.deliver_webhook(
        job_id, event_id, event_type, at, f"{event_id}-{uuid.uuid4().hex}"
    )
    client.lpush(queue, payload)


# Counts a replay only when both counters are under their limits; else the seconds until the
# fuller window ends. KEYS: the job's counter, the tenant's. ARGV: per job, per tenant, window.
_TAKE_REPLAY = """
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
for i = 1, 2 do
  if tonumber(redis.call('GET', KEYS[i]) or '0') >= limits[i] then
    return math.max(redis.call('TTL', KEYS[i]), 1)
  end
end
for i = 1, 2 do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[3], 'NX')
end
return 0
"""


def take_replay(
    client: redis.Redis, keys: Keys, tenant: str, job_id: str, *, per_job: int, per_tenant: int, window_s: int
) -> int | None:
    """Count one replay of ``job_id`` for ``tenant``: None when it may go ahead, else the seconds
    until the full window ends (a refused replay is not counted).

    Each replay queues up to 8 attempts on the queue every tenant shares, so replays are rationed
    per job and per tenant, in fixed windows of ``window_s``.
    """
    wait_s = client.eval(
        _TAKE_REPLAY,
        2,
        keys.replays_of_job(job_id),
        keys.replays_of_tenant(tenant),
        per_job,
        per_tenant,
        window_s,
    )
    return int(wait_s) or None


def disabled_urls(client: redis.Redis, keys: Keys, tenant: str) -> set[str]:
    return {u.decode() for u in client.smembers(keys.webhooks_disabled(tenant))}


_DISABLE = """
redis.call('SADD', KEYS[1], ARGV[1])
local extra = redis.call('SCARD', KEYS[1]) - tonumber(ARGV[2])
if extra > 0 then
    for _, member in ipairs(redis.call('SRANDMEMBER', KEYS[1], extra + 1)) do
        if extra > 0 and member ~= ARGV[1] then
            redis.call('SREM', KEYS[1], member)
            extra = extra - 1
        end
    end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
"""


def disable_url(client: redis.Redis, keys: Keys, tenant: str, url: str, *, max_urls: int, ttl_s: int) -> None:
    """Skip deliveries to ``url`` after it answered 410. A tenant's set keeps at most ``max_urls``
    (others, at random, go: a URL still gone answers 410 again) and ends ``ttl_s`` after its
    last 410."""
    client.eval(_DISABLE, 1, keys.webhooks_disabled(tenant), url, max_urls, ttl_s)


def enable_url(client: redis.Redis, keys: Keys, tenant: str, url: str) -> bool:
    """Deliver to ``url`` again after a 410 disabled it; False if it was not disabled."""
    return bool(client.srem(keys.webhooks_disabled(tenant), url))

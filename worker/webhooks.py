"""Webhook delivery: a CPU-only Celery worker that POSTs job events to the job's webhook URL.

Start it with ``python -m worker.webhooks [extra celery worker args]``: it consumes only the
``webhooks`` queue, on a thread pool (``FLEET_WEBHOOK_CONCURRENCY`` threads, default 8; the work
is waiting on other people's servers). It never imports torch.

The job store queues ``fleet.deliver_webhook(job_id, event_id, event_type, at)`` in the same
atomic write as the state change (``routing.jobs.store``), so every event a webhook asked for is
delivered at least once. What a receiver gets follows Standard Webhooks:

- headers ``webhook-id`` (the event's id), ``webhook-timestamp`` (Unix seconds of this attempt),
  ``webhook-signature`` (``v1,<base64 HMAC-SHA256>`` with the tenant's ``whsec_`` secret) and
  ``content-type: application/json``. ``standardwebhooks.Webhook(secret).verify(body, headers)``
  checks the signature and refuses a timestamp more than 5 minutes off.
- body ``{"type": "job.succeeded", "timestamp": <ISO 8601 of the event>, "data": {...the job}}``,
  the job in the shape ``GET /v1/jobs/{id}`` answers (``routing.jobs.record.JobView``; its
  ``queue_position`` and ``eta_s`` are null here).

**Receivers must dedupe by ``webhook-id``.** It is the same on every attempt and every replay of
one event, and an event can arrive more than once (a 2xx lost on the way back, a replay, a worker
that died after posting). Timestamp and signature are new on each attempt. Deliveries of one
job's events run concurrently and retry independently, so they can arrive out of order: order by
``timestamp``. ``data`` is the job as it is when the attempt is made (a finished job no longer
changes); output URLs are presigned afresh on each attempt.

Rules: a 2xx is delivered; anything else, redirects included (they are never followed), is a
failure, retried with exponential backoff and full jitter up to ``FLEET_WEBHOOK_MAX_ATTEMPTS``
attempts; a 429 or 503 with ``Retry-After`` waits as long as it says, up to the same cap as the
backoff (``FLEET_WEBHOOK_RETRY_CAP_S``). ``410 Gone`` disables the URL for the
tenant: later deliveries to it are skipped and logged as ``disabled``. A URL the address rules
refuse (``routing.io.net``) fails at once. Every attempt is logged per job (``delivery_log``).

One tenant's endpoints hold at most ``FLEET_WEBHOOK_TENANT_CONCURRENCY`` of a worker's threads at
once, for the whole attempt (the name lookup included), each POST for at most
``FLEET_WEBHOOK_TIMEOUT_S``: a delivery past that bound is ``deferred`` without using up one of its
attempts, tried again after ``DEFER_S`` doubling up to ``DEFER_CAP_S``; once a delivery has been
deferred ``FLEET_WEBHOOK_MAX_DEFERRALS`` times, each further deferral counts as a failed attempt, so a tenant
with slow receivers or slow name servers delays its own events, not everyone's, and a delivery that
never gets a slot still ends.

A delivery waits out each retry countdown holding its message unacknowledged; the settings keep
the longest wait plus a POST below the webhook queue's visibility timeout, after which Kombu would
hand a copy of the message to another worker. A copy still turns up when a worker is too busy to
run a due retry in time, or dies holding one, so each attempt is claimed in Redis first
(``Deliverer.claim``, per task id and attempt number): a copy whose attempt is claimed is dropped
and logged. The claim is a lease until the attempt's outcome is recorded (and its retry queued): a
worker that dies mid-attempt leaves an expiring claim, and the copy Kombu restores after the
visibility timeout makes the attempt again, the one case where a receiver can get one attempt twice
(it dedupes by webhook-id).
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import redis
from celery import Celery
from kombu import Queue
from standardwebhooks import Webhook as Signer

from routing.celery_config import DELIVER_WEBHOOK_TASK, make_celery, webhook_transport_options
from routing.classes import WEBHOOK_QUEUE
from routing.errors import NotFound
from routing.io.connection import connect
from routing.io.net import UrlError, UrlLookupError, UrlPolicy, check_url, post_url
from routing.io.storage import Storage, StorageError, make_storage
from routing.jobs import webhook_log
from routing.jobs.keys import Keys
from routing.jobs.record import JobRecord, JobView
from routing.jobs.store import JobStore
from routing.settings import Settings, get_settings
from worker import held

# The retry schedule (settings.webhook_retry_base_s, webhook_retry_cap_s): delay before attempt n+1
# is uniform in [0, min(cap, base * factor^(n-1))] (full jitter: a receiver that was down is not
# hit by every retry at once when it comes back), but at least RETRY_MIN_S, because
# webhook-timestamp has whole-second resolution and each attempt is promised a new one.
RETRY_FACTOR = 2.0
RETRY_MIN_S = 1.0
DEFER_S = 1.0
DEFER_CAP_S = 30.0
# How long an attempt's claim holds before its outcome is recorded: the POST's deadline plus this,
# for what has no deadline of its own (name resolution) and the writes after it.
CLAIM_SLACK_S = 60.0
LOG_MAX_ENTRIES = 1000  # per job: a long job's progress events must not grow the log unbounded

# Outcomes of one attempt, as logged.
DELIVERED, RETRYING, FAILED, DISABLED, REFUSED = "delivered", "retrying", "failed", "disabled", "refused"
DEFERRED = "deferred"  # the tenant's endpoints held all the threads it may have: not an attempt
DUPLICATE = "duplicate"  # a copy of a message whose attempt is claimed: dropped, in the worker's log only

log = logging.getLogger(__name__)


def backoff_s(attempt: int, settings: Settings) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based)."""
    ceiling = min(settings.webhook_retry_cap_s, settings.webhook_retry_base_s * RETRY_FACTOR ** (attempt - 1))
    return max(RETRY_MIN_S, random.uniform(0, ceiling))


def retry_after_s(value: str | None, cap_s: float, now: float | None = None) -> float | None:
    """A ``Retry-After`` header (delay in seconds, or an HTTP date) as seconds from now, at most
    ``cap_s``; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), cap_s)


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def build_payload(record: JobRecord, event_type: str, at: str, storage: Storage, expires_s: int) -> dict:
    """The JSON body of a delivery: the event, and the job as it is now in the API's shape."""
    outputs = [o.with_url(storage.url(o.key, expires_s)) for o in record.outputs]
    return {
        "type": event_type,
        "timestamp": _iso(float(at)),
        "data": JobView.of(record, outputs=outputs).to_json(),
    }


def defer_s(deferred: int) -> float:
    """Seconds before the next try of a delivery deferred ``deferred`` times before this one."""
    return min(DEFER_CAP_S, DEFER_S * RETRY_FACTOR**deferred)


def signed_headers(secret: str, event_id: str, body: str) -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Signer(secret).sign(event_id, now, body),
    }


@dataclass(frozen=True)
class Attempt:
    outcome: str
    status_code: int | None = None
    error: str | None = None
    retry_in_s: float | None = None


class Deliverer:
    """Makes one delivery attempt and logs it. Shared by the pool's threads."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None):
        self.settings = settings
        self.client = client or connect(settings)
        self.keys = Keys(settings.key_prefix)
        self.store = JobStore(
            self.client,
            self.keys,
            ttl_s=settings.job_ttl_s,
            usage_retention_days=settings.usage_retention_days,
        )
        self.policy = UrlPolicy.of(settings)
        self._lock = threading.Lock()
        self._posting: dict[str, int] = {}  # tenant -> deliveries in flight in this process

    def _take_slot(self, tenant: str) -> bool:
        with self._lock:
            if self._posting.get(tenant, 0) >= self.settings.webhook_tenant_concurrency:
                return False
            self._posting[tenant] = self._posting.get(tenant, 0) + 1
            return True

    def _free_slot(self, tenant: str) -> None:
        with self._lock:
            self._posting[tenant] -= 1

    def claim(self, delivery_id: str, attempt: int) -> bool:
        """Take attempt ``attempt`` of delivery ``delivery_id`` (its task id); False when a copy of
        its message has it. Held as a lease until ``settle`` or ``release``."""
        lease_s = self.settings.webhook_timeout_s + CLAIM_SLACK_S
        key = self.keys.webhook_attempt(delivery_id, attempt)
        return bool(self.client.set(key, "claimed", nx=True, px=int(lease_s * 1000)))

    def settle(self, delivery_id: str, attempt: int) -> None:
        """The attempt is over and what follows it is queued: no copy may make it again while a
        copy of any message of this delivery can still turn up."""
        s = self.settings
        keep_s = (
            s.webhook_max_attempts * (s.webhook_retry_cap_s + s.webhook_timeout_s)
            + s.webhook_visibility_timeout_s
        )
        self.client.set(self.keys.webhook_attempt(delivery_id, attempt), "made", ex=int(keep_s))

    def release(self, delivery_id: str, attempt: int) -> None:
        """The attempt was deferred before posting: its next try takes the claim again."""
        self.client.delete(self.keys.webhook_attempt(delivery_id, attempt))

    @cached_property
    def storage(self) -> Storage:
        return make_storage(self.settings)

    def deliver(
        self, job_id: str, event_id: str, event_type: str, at: str, attempt: int, deferred: int = 0
    ) -> Attempt:
        """Make attempt ``attempt``; ``deferred`` is how many times in a row it was deferred."""
        started = time.monotonic()
        url = ""
        try:
            record = self.store.get(job_id)
            url = record.webhook.url if record.webhook else ""
            result = self._attempt(record, event_id, event_type, at, attempt, deferred)
        except NotFound:
            result = Attempt(FAILED, error="the job record is gone")
        entry = {
            "event_id": event_id,
            "type": event_type,
            "attempt": attempt,
            "at": _iso(time.time()),
            "event_at": at,  # pass back to replay()
            "url": url,
            "status_code": result.status_code,
            "error": result.error,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
            "outcome": result.outcome,
            "retry_in_s": result.retry_in_s,
        }
        key = self.keys.webhook_log(job_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(entry, separators=(",", ":")))
            pipe.ltrim(key, -LOG_MAX_ENTRIES, -1)
            pipe.expire(key, self.settings.job_ttl_s)
            pipe.execute()
        return result

    def _attempt(
        self, record: JobRecord, event_id: str, event_type: str, at: str, attempt: int, deferred: int
    ) -> Attempt:
        if record.webhook is None:
            return Attempt(FAILED, error="the job has no webhook")
        url = record.webhook.url
        tenant = self.settings.tenants.get(record.tenant)
        if tenant is None:
            return Attempt(FAILED, error=f"tenant {record.tenant!r} is not configured: no webhook secret")
        if self.client.sismember(self.keys.webhooks_disabled(record.tenant), url):
            return Attempt(DISABLED, error="endpoint disabled: it answered 410 Gone")
        # The tenant's slot covers the whole attempt: a slow name server holds a thread as long
        # as a slow receiver does.
        if not self._take_slot(record.tenant):
            limit = self.settings.webhook_tenant_concurrency
            error = f"{limit} deliveries of this tenant in flight"
            if deferred >= self.settings.webhook_max_deferrals:
                return self._retry_or_fail(attempt, None, f"{error}, deferred {deferred} times", None)
            return Attempt(DEFERRED, error=error, retry_in_s=defer_s(deferred))
        try:
            return self._post(record, event_id, event_type, at, attempt)
        finally:
            self._free_slot(record.tenant)

    def _post(self, record: JobRecord, event_id: str, event_type: str, at: str, attempt: int) -> Attempt:
        url = record.webhook.url
        tenant = self.settings.tenants[record.tenant]
        try:
            # Checked here as well as at submit: the name may resolve elsewhere now. A refusal is
            # permanent; a failure to connect or a timeout after this passes is retried.
            check_url(url, self.policy)
        except UrlLookupError as exc:  # DNS trouble may pass: retry like a failed connection
            return self._retry_or_fail(attempt, None, str(exc), None)
        except UrlError as exc:
            return Attempt(REFUSED, error=str(exc))
        try:
            payload = build_payload(record, event_type, at, self.storage, self.settings.presign_expiry_s)
        except StorageError as exc:
            return self._retry_or_fail(attempt, None, f"presigning outputs: {exc}", None)
        body = json.dumps(payload, separators=(",", ":"))
        headers = signed_headers(tenant.webhook_secret.get_secret_value(), event_id, body)
        try:
            response = post_url(
                url, body.encode(), headers, timeout_s=self.settings.webhook_timeout_s, policy=self.policy
            )
        except UrlError as exc:
            return self._retry_or_fail(attempt, None, str(exc), None)
        status = response.status
        if 200 <= status < 300:
            return Attempt(DELIVERED, status)
        if status == 410:
            webhook_log.disable_url(
                self.client,
                self.keys,
                record.tenant,
                url,
                max_urls=self.settings.webhook_disabled_max_urls,
                ttl_s=self.settings.webhook_disabled_ttl_s,
            )
            return Attempt(DISABLED, status, "410 Gone: endpoint disabled")
        error = f"HTTP {status}"
        if 300 <= status < 400:
            error += f" redirect to {response.headers.get('location', '?')} (not followed)"
        elif response.body:
            error += ": " + response.body[:200].decode(errors="replace")
        retry_after = response.headers.get("retry-after") if status in (429, 503) else None
        wait = retry_after_s(retry_after, self.settings.webhook_retry_cap_s)
        return self._retry_or_fail(attempt, status, error, wait)

    def _retry_or_fail(self, attempt: int, status: int | None, error: str, wait_s: float | None) -> Attempt:
        if attempt >= self.settings.webhook_max_attempts:
            return Attempt(FAILED, status, f"{error} (gave up after {attempt} attempts)")
        # The floor holds for Retry-After too: a date already past must not reuse this second.
        delay = backoff_s(attempt, self.settings) if wait_s is None else max(RETRY_MIN_S, wait_s)
        return Attempt(RETRYING, status, error, delay)


def create_app(settings: Settings) -> Celery:
    """The webhook worker's Celery app, with ``fleet.deliver_webhook`` registered."""
    app = make_celery(settings)
    # Kombu's transport with the fleet's acknowledgements (worker.held: no holder here, so only
    # an unanswered ack given up, where Kombu's would keep a thread's slot for good).
    held.use_transport(app, settings)
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        **webhook_transport_options(settings),
    }
    app.conf.task_queues = [Queue(WEBHOOK_QUEUE, routing_key=WEBHOOK_QUEUE)]
    app.conf.task_default_queue = WEBHOOK_QUEUE
    # The thread pool cannot enforce time limits; each POST has its own timeout.
    app.conf.task_time_limit = None
    app.conf.task_soft_time_limit = None
    deliverers: list[Deliverer] = []  # built on the first task, not at import

    @app.task(name=DELIVER_WEBHOOK_TASK, bind=True, max_retries=None)
    def deliver_webhook(
        self: Any, job_id: str, event_id: str, event_type: str, at: str, deferred: int = 0
    ) -> str:
        if not deliverers:
            deliverers.append(Deliverer(settings))
        deliverer = deliverers[0]
        attempt = self.request.retries + 1 - deferred  # deferrals are retries that posted nothing
        delivery_id = self.request.id
        if not deliverer.claim(delivery_id, attempt):
            log.warning(
                "webhook %s: attempt %d of delivery %s is claimed by another copy of its message, "
                "this copy is dropped",
                event_id,
                attempt,
                delivery_id,
            )
            return DUPLICATE
        result = deliverer.deliver(job_id, event_id, event_type, at, attempt=attempt, deferred=deferred)
        if result.outcome == DEFERRED:
            deliverer.release(delivery_id, attempt)
            raise self.retry(countdown=result.retry_in_s, kwargs={"deferred": deferred + 1})
        # Settled once the retry is queued: a worker that dies in between leaves the lease to run
        # out, and the restored copy makes the attempt again rather than never.
        retry = None
        if result.outcome == RETRYING:
            # Same task id, so the retry carries the same event id (webhook-id).
            retry = self.retry(countdown=result.retry_in_s, throw=False)
        deliverer.settle(delivery_id, attempt)
        if retry is not None:
            raise retry
        return result.outcome

    return app


def main(argv: list[str]) -> None:
    app = create_app(get_settings())
    app.worker_main(
        [
            "worker",
            "--queues",
            WEBHOOK_QUEUE,
            "--pool",
            "threads",
            "--concurrency",
            str(get_settings().webhook_concurrency),
            "--hostname",
            "webhooks@%h",
            "--loglevel",
            "INFO",
            *argv,
        ]
    )


def __getattr__(name: str) -> Any:
    # ``celery -A worker.webhooks`` finds ``app``; importing the module for delivery_log or replay
    # builds nothing.
    if name == "app":
        return create_app(get_settings())
    raise AttributeError(name)


if __name__ == "__main__":
    main(sys.argv[1:])

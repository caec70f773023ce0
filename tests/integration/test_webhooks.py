"""Webhook delivery end to end: real Redis, a real ``python -m worker.webhooks`` process, and a real
HTTP receiver on 127.0.0.2 (allowed by the test settings; all other loopback stays refused) that
verifies every delivery with ``standardwebhooks`` and dedupes by webhook-id, as a tenant's would.

No GPU worker: jobs are moved by hand with ``client.store.transition``/``progress``, which queue
deliveries exactly as the GPU worker's calls do. Retries are shortened through the environment.
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from standardwebhooks import Webhook as Signer
from standardwebhooks.webhooks import WebhookVerificationError

from localfleet.process import WorkerProcess
from producer.client import Client
from routing.celery_config import webhook_transport_options
from routing.classes import WEBHOOK_QUEUE
from routing.errors import InvalidRequest
from routing.jobs import lifecycle
from routing.jobs import webhook_log as shared
from routing.jobs.events import Webhook
from routing.jobs.keys import Keys
from routing.jobs.record import JobStatus, Output
from routing.settings import Settings, Tenant
from tests.webhook_receiver import Receiver
from worker import webhooks

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
REQUEST = {"model": "z-image-turbo", "prompt": "a red fox", "width": 512, "height": 512, "steps": 8}
# The first three retries wait the 1 s floor (a new webhook-timestamp per attempt; 0.2 s doubling
# stays below it), so the schedule is known. The cap also bounds Retry-After: 3 s leaves room for
# the 2 s the 429 test asks for.
FAST_RETRIES = {"FLEET_WEBHOOK_RETRY_BASE_S": "0.2", "FLEET_WEBHOOK_RETRY_CAP_S": "3"}


def wait_until(check: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def settled(client: Client) -> bool:
    """Every delivery queued so far has been attempted and logged: none waits in the webhooks
    queue and the webhook worker holds none (acknowledged after its attempt; a retry waiting out
    its countdown is held, unacknowledged). What a test waits for before asserting that some
    delivery did not happen."""
    unacked = webhook_transport_options(client.settings)["unacked_key"]
    return client.store.client.llen(WEBHOOK_QUEUE) == 0 and client.store.client.hlen(unacked) == 0


@pytest.fixture
def settings(fleet_settings: Settings) -> Settings:
    tenant = Tenant(api_keys=["key-t1"], webhook_secret=SECRET)
    return fleet_settings.model_copy(update={"tenants": {"t1": tenant}, "url_allow_cidrs": ["127.0.0.2/32"]})


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(SECRET)
    yield server
    server.close()


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(settings, tmp_path / "webhooks.log", FAST_RETRIES, module="worker.webhooks")
    try:
        yield process.wait_ready(timeout_s=30)
    finally:
        process.stop()


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as fleet_client:
        yield fleet_client


@pytest.fixture
def log(client: Client) -> Callable[[str], list[dict]]:
    return lambda job_id: shared.delivery_log(client.store.client, client.keys, job_id)


def event_id(client: Client, job_id: str, event_type: str) -> str:
    return next(e["event_id"] for e in client.store.events(job_id) if e["type"] == event_type)


def test_retries_until_2xx_with_one_webhook_id_and_the_receiver_applies_it_once(
    worker, receiver: Receiver, client: Client, settings: Settings, log
) -> None:
    receiver.plan("/hook", 500, 500, 500)
    job = client.submit(REQUEST, webhook=Webhook(receiver.url("/hook"), ("succeeded",)), tenant="t1")
    client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
    key = f"jobs/{job.id}/attempt-1/output-0.png"
    output = Output(key, "image/png", 100, width=512, height=512)
    client.store.move(
        job.id,
        lifecycle.finish(
            JobStatus.SUCCEEDED, owner=None, attempt=None, finished_at=time.time(), outputs=[output]
        ),
    )

    wait_until(lambda: len(receiver.deliveries) == 4 and len(log(job.id)) == 4)
    deliveries = receiver.deliveries
    assert all(d.verified for d in deliveries)
    succeeded_id = event_id(client, job.id, "job.succeeded")
    assert {d.headers["webhook-id"] for d in deliveries} == {succeeded_id}
    assert len({d.headers["webhook-timestamp"] for d in deliveries}) == 4
    assert len({d.headers["webhook-signature"] for d in deliveries}) == 4
    assert list(receiver.applied) == [succeeded_id]
    payload = receiver.applied[succeeded_id]
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job.id and payload["data"]["status"] == "succeeded"
    assert payload["data"]["outputs"][0]["url"].endswith(key)
    assert [(e["outcome"], e["status_code"], e["attempt"]) for e in log(job.id)] == [
        ("retrying", 500, 1), ("retrying", 500, 2), ("retrying", 500, 3), ("delivered", 200, 4)
    ]  # fmt: skip

    # A replay is the same event again: same webhook-id, and the receiver does not apply it twice.
    entry = log(job.id)[0]
    shared.replay(
        client.store.messages,
        client.store.client,
        job.id,
        entry["event_id"],
        entry["type"],
        entry["event_at"],
    )
    wait_until(lambda: len(receiver.deliveries) == 5 and len(log(job.id)) == 5)
    assert receiver.deliveries[-1].headers["webhook-id"] == succeeded_id
    assert receiver.deliveries[-1].verified
    assert list(receiver.applied) == [succeeded_id]
    assert log(job.id)[-1]["outcome"] == "delivered"


def test_tampered_body_and_stale_timestamp_fail_verification(
    worker, receiver: Receiver, client: Client
) -> None:
    job = client.submit(REQUEST, webhook=Webhook(receiver.url("/hook"), ("started",)), tenant="t1")
    client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
    wait_until(lambda: len(receiver.deliveries) == 1)
    captured = receiver.deliveries[0]
    assert receiver.verify(captured.body, captured.headers)

    tampered = captured.body.replace(b'"status":"running"', b'"status":"succeeded"')
    assert tampered != captured.body
    assert not receiver.verify(tampered, captured.headers)

    # Correctly signed, but six minutes old: a replayed capture must not be accepted.
    stale = datetime.now(UTC) - timedelta(minutes=6)
    stale_headers = captured.headers | {
        "webhook-timestamp": str(int(stale.timestamp())),
        "webhook-signature": Signer(SECRET).sign(
            captured.headers["webhook-id"], stale, captured.body.decode()
        ),
    }
    with pytest.raises(WebhookVerificationError, match="too old"):
        Signer(SECRET).verify(captured.body, stale_headers)
    assert not receiver.verify(captured.body, stale_headers)


def test_a_delivery_gives_up_at_webhook_max_attempts(
    receiver: Receiver, client: Client, settings: Settings, log
) -> None:
    receiver.plan("/hook", 500, 500, 500)
    job = client.submit(REQUEST, webhook=Webhook(receiver.url("/hook"), ("started",)), tenant="t1")
    client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
    started = next(e for e in client.store.events(job.id) if e["type"] == "job.started")
    deliverer = webhooks.Deliverer(settings.model_copy(update={"webhook_max_attempts": 2}))

    first = deliverer.deliver(job.id, started["event_id"], started["type"], started["at"], attempt=1)
    second = deliverer.deliver(job.id, started["event_id"], started["type"], started["at"], attempt=2)
    assert (first.outcome, second.outcome) == (webhooks.RETRYING, webhooks.FAILED)
    assert "gave up after 2 attempts" in second.error
    assert [e["outcome"] for e in log(job.id)] == ["retrying", "failed"]
    assert len(receiver.hits("/hook")) == 2


def test_retry_delays_follow_the_settings(settings: Settings) -> None:
    schedule = settings.model_copy(update={"webhook_retry_base_s": 4.0, "webhook_retry_cap_s": 10.0})
    for attempt, ceiling in ((1, 4.0), (2, 8.0), (3, 10.0), (9, 10.0)):
        delays = [webhooks.backoff_s(attempt, schedule) for _ in range(200)]
        assert all(webhooks.RETRY_MIN_S <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jitter spreads over the whole range


def test_410_disables_the_endpoint_for_later_events(worker, receiver: Receiver, client: Client, log) -> None:
    receiver.plan("/gone", 410)
    url = receiver.url("/gone")
    job = client.submit(REQUEST, webhook=Webhook(url, ("started", "succeeded")), tenant="t1")
    client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
    wait_until(lambda: [e["outcome"] for e in log(job.id)] == ["disabled"])
    assert log(job.id)[0]["status_code"] == 410
    assert shared.disabled_urls(client.store.client, client.keys, "t1") == {url}

    client.store.move(
        job.id, lifecycle.finish(JobStatus.SUCCEEDED, owner=None, attempt=None, finished_at=time.time())
    )
    wait_until(lambda: len(log(job.id)) == 2)
    last = log(job.id)[-1]
    assert (last["type"], last["outcome"], last["status_code"]) == ("job.succeeded", "disabled", None)
    assert len(receiver.hits("/gone")) == 1


def test_redirect_is_a_failure_and_is_not_followed(worker, receiver: Receiver, client: Client, log) -> None:
    receiver.plan("/hook", (302, {"Location": "/elsewhere"}))
    job = client.submit(REQUEST, webhook=Webhook(receiver.url("/hook"), ("started",)), tenant="t1")
    client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
    wait_until(lambda: len(log(job.id)) == 2)
    assert [(e["outcome"], e["status_code"]) for e in log(job.id)] == [("retrying", 302), ("delivered", 200)]
    assert "/elsewhere" in log(job.id)[0]["error"]
    assert len(receiver.hits("/hook")) == 2
    assert receiver.hits("/elsewhere") == []


def test_429_retry_after_sets_the_next_delay(worker, receiver: Receiver, client: Client, log) -> None:
    # 2 s: above the 1 s the test's backoff would wait anyway, so ignoring the header shows.
    receiver.plan("/hook", (429, {"Retry-After": "2"}))
    job = client.submit(REQUEST, webhook=Webhook(receiver.url("/hook"), ("started",)), tenant="t1")
    client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
    wait_until(lambda: len(log(job.id)) == 2)
    first, second = receiver.hits("/hook")
    assert second.at - first.at >= 1.9
    assert [(e["outcome"], e["status_code"], e["retry_in_s"]) for e in log(job.id)] == [
        ("retrying", 429, 2.0), ("delivered", 200, None)
    ]  # fmt: skip
    # The HTTP-date form, and the cap.
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= webhooks.retry_after_s(in_30_s, cap_s=600) <= 30.5
    assert webhooks.retry_after_s("99999999", cap_s=600) == 600


def test_webhook_to_a_refused_address_is_refused_at_submit(client: Client, redis_client) -> None:
    with pytest.raises(InvalidRequest, match="loopback") as refused:
        client.submit(REQUEST, webhook=Webhook("http://127.0.0.1:9/hook"), tenant="t1")
    assert refused.value.fields == ["webhook.url"]
    assert redis_client.llen("gpu16") == 0  # nothing was queued


def test_events_filter_skips_events_not_asked_for(worker, receiver: Receiver, client: Client, log) -> None:
    job = client.submit(REQUEST, webhook=Webhook(receiver.url("/hook"), ("succeeded",)), tenant="t1")
    client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
    client.store.move(
        job.id, lifecycle.finish(JobStatus.SUCCEEDED, owner=None, attempt=None, finished_at=time.time())
    )
    wait_until(lambda: len(receiver.deliveries) >= 1 and settled(client))
    assert [json.loads(d.body)["type"] for d in receiver.deliveries] == ["job.succeeded"]
    assert [e["type"] for e in log(job.id)] == ["job.succeeded"]


def test_progress_webhooks_are_throttled(worker, receiver: Receiver, client: Client) -> None:
    job = client.submit(REQUEST, webhook=Webhook(receiver.url("/hook"), ("progress",)), tenant="t1")
    client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
    for step in range(1, 5):  # well within the 2 s interval
        client.store.progress(job.id, step, 10)
    client.store.progress(job.id, 10, 10)  # the last step is always sent
    assert len([e for e in client.store.events(job.id) if e["type"] == "job.progress"]) == 5
    wait_until(lambda: len(receiver.deliveries) >= 2 and settled(client))
    payloads = [json.loads(d.body) for d in receiver.deliveries]
    assert len(payloads) == 2
    assert {p["type"] for p in payloads} == {"job.progress"}
    assert all(d.verified for d in receiver.deliveries)
    assert {p["data"]["progress"]["total"] for p in payloads} == {10}


def test_keys_follow_the_prefix() -> None:
    keys = Keys("p")
    assert keys.webhooks_disabled("t1") == "p:webhooks:disabled:t1"
    assert keys.webhook_log("j") == "p:webhooks:log:j"
    assert keys.webhook_attempt("d", 2) == "p:webhooks:attempt:d:2"


def test_address_refused_at_delivery_fails_without_retry(
    worker, receiver: Receiver, settings: Settings, client: Client, log
) -> None:
    # Accepted by a laxer submitter, refused by the worker's own check before any connection.
    lax = settings.model_copy(update={"url_allow_cidrs": ["127.0.0.0/8"]})
    with Client(lax) as lax_client:
        url = f"http://127.0.0.3:{receiver.port}/hook"
        job = lax_client.submit(REQUEST, webhook=Webhook(url, ("started",)), tenant="t1")
        lax_client.store.move(job.id, lifecycle.claim(lax_client.store.get(job.id), "", time.time()))
    # Settled: a retry would be held (waiting out its countdown) until it had run.
    wait_until(lambda: len(log(job.id)) >= 1 and settled(client))
    entries = log(job.id)
    assert [(e["outcome"], e["status_code"]) for e in entries] == [("refused", None)]
    assert "loopback" in entries[0]["error"]
    assert receiver.deliveries == []


def restore_waiting_retry(client: Client, delivery_id: str, retries: int) -> None:
    """Do to a delivery's waiting retry what Kombu's restore does once the webhook queue's
    visibility timeout runs out on it: take it out of the unacknowledged set and push the same
    message, marked redelivered, back onto the queue (``kombu.transport.redis``)."""
    redis = client.store.client
    found = {}

    def waiting() -> bool:
        for tag, raw in redis.hgetall("webhooks_unacked").items():
            payload, _exchange, routing_key = json.loads(raw)
            if (payload["headers"]["id"], payload["headers"]["retries"]) == (delivery_id, retries):
                found.update(tag=tag, payload=payload, queue=routing_key)
                return True
        return False

    wait_until(waiting)
    payload = found["payload"]
    payload["headers"]["redelivered"] = True
    payload["properties"]["delivery_info"]["redelivered"] = True
    with redis.pipeline(transaction=True) as pipe:
        pipe.zrem("webhooks_unacked_index", found["tag"])
        pipe.hdel("webhooks_unacked", found["tag"])
        pipe.rpush(found["queue"], json.dumps(payload))
        pipe.execute()


def test_a_copy_of_a_retry_waiting_out_retry_after_is_dropped(
    receiver: Receiver, client: Client, settings: Settings, tmp_path: Path, log
) -> None:
    # The receiver asks for 6 s; while the retry waits, its message is handed out a second time,
    # as the broker does when the wait outlives the queue's visibility timeout. Both copies come
    # due together: the receiver must still get attempt 2 once.
    waits = settings.model_copy(update={"webhook_retry_cap_s": 8.0})
    process = WorkerProcess(waits, tmp_path / "webhooks.log", module="worker.webhooks")
    try:
        worker = process.wait_ready(timeout_s=30)
        receiver.plan("/hook", (503, {"Retry-After": "6"}))
        job = client.submit(REQUEST, webhook=Webhook(receiver.url("/hook"), ("started",)), tenant="t1")
        client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
        started_id = event_id(client, job.id, "job.started")
        wait_until(lambda: len(log(job.id)) == 1)

        restore_waiting_retry(client, started_id, retries=1)

        # Both copies have run (the first try, and two of the retry), whatever each did.
        wait_until(lambda: worker.log().count(f"deliver_webhook[{started_id}] succeeded") == 2, 30)
    finally:
        process.stop()
    assert [d.verified for d in receiver.hits("/hook")] == [True, True]
    assert [(e["outcome"], e["status_code"], e["attempt"]) for e in log(job.id)] == [
        ("retrying", 503, 1), ("delivered", 200, 2)
    ]  # fmt: skip
    assert "'duplicate'" in worker.log()
    assert f"attempt 2 of delivery {started_id} is claimed by another copy" in worker.log()


def test_retry_after_waits_at_most_the_retry_cap(
    receiver: Receiver, client: Client, settings: Settings
) -> None:
    capped = settings.model_copy(update={"webhook_retry_cap_s": 5.0})
    deliverer = webhooks.Deliverer(capped, client.store.client)
    waits = []
    for asked in ("4", "5", "6", "99999999"):
        receiver.plan("/hook", (503, {"Retry-After": asked}))
        job = client.submit(REQUEST, webhook=Webhook(receiver.url("/hook"), ("started",)), tenant="t1")
        client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
        result = deliverer.deliver(
            job.id, event_id(client, job.id, "job.started"), "job.started", "0", attempt=1
        )
        assert (result.outcome, result.status_code) == (webhooks.RETRYING, 503)
        waits.append(result.retry_in_s)
    assert waits == [4.0, 5.0, 5.0, 5.0]


def test_each_attempt_is_claimed_once_until_its_lease_runs_out(client: Client, settings: Settings) -> None:
    deliverer = webhooks.Deliverer(
        settings.model_copy(update={"webhook_timeout_s": 0.5}), client.store.client
    )
    assert deliverer.claim("d1", 1)
    assert not deliverer.claim("d1", 1)  # a copy of the same attempt
    assert deliverer.claim("d1", 2) and deliverer.claim("d2", 1)  # the next attempt; another delivery

    deliverer.release("d1", 2)  # deferred before posting: its next try makes attempt 2
    assert deliverer.claim("d1", 2)

    deliverer.settle("d1", 1)
    key = client.keys.webhook_attempt("d1", 1)
    assert client.store.client.ttl(key) > settings.webhook_visibility_timeout_s
    assert not deliverer.claim("d1", 1)

    # A worker that died mid-attempt: its claim runs out, and the copy the broker restores later
    # makes the attempt rather than never.
    lease_s = 0.5 + webhooks.CLAIM_SLACK_S
    assert 0 < client.store.client.pttl(client.keys.webhook_attempt("d2", 1)) <= lease_s * 1000
    client.store.client.pexpire(client.keys.webhook_attempt("d2", 1), 50)
    time.sleep(0.1)
    assert deliverer.claim("d2", 1)

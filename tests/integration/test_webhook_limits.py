"""What one tenant's webhook endpoints can take from the webhook worker: each delivery has one
deadline however slowly the receiver answers, and one tenant's deliveries hold at most
``webhook_tenant_concurrency`` of the worker's threads. ``Deliverer`` runs in this process against
real Redis and real receivers on 127.0.0.2; the bound is also checked through a real
``python -m worker.webhooks`` process."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from producer.client import Client
from routing.jobs import lifecycle
from routing.jobs.events import Webhook
from routing.jobs.webhook_log import delivery_log
from routing.settings import Settings, Tenant
from tests.faults.harness import wait_for
from worker.webhooks import DEFERRED, DELIVERED, FAILED, RETRYING, Deliverer, defer_s

pytestmark = pytest.mark.integration

REQUEST = {"model": "z-image-turbo", "prompt": "a red fox", "width": 512, "height": 512, "steps": 8}


class SlowReceiver:
    """``/drip`` answers a byte every 0.2 s; ``/hold`` answers once ``release`` is set; others 200.
    Counts the requests ``/hold`` holds at once, and notes how many it held as each other request
    came."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.held = threading.Event()  # set when /hold has a request waiting
        self.lock = threading.Lock()
        self.holding = 0
        self.most_held = 0
        self.others: list[tuple[str, int]] = []  # (path, requests /hold held as it came)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    if self.path == "/drip":
                        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                        for _ in range(50):
                            if receiver.release.wait(0.2):
                                return
                            self.wfile.write(b"X")
                            self.wfile.flush()
                        return
                    if self.path == "/hold":
                        with receiver.lock:
                            receiver.holding += 1
                            receiver.most_held = max(receiver.most_held, receiver.holding)
                        receiver.held.set()
                        try:
                            receiver.release.wait(10)
                        finally:
                            with receiver.lock:
                                receiver.holding -= 1
                    else:
                        with receiver.lock:
                            receiver.others.append((self.path, receiver.holding))
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the deliverer hung up at its deadline

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@pytest.fixture
def settings(fleet_settings: Settings) -> Settings:
    tenants = {name: Tenant(api_keys=[f"key-{name}"], webhook_secret=secret()) for name in ("t1", "t2")}
    return fleet_settings.model_copy(
        update={
            "tenants": tenants,
            "url_allow_cidrs": ["127.0.0.2/32"],
            "webhook_timeout_s": 1.0,
            "webhook_tenant_concurrency": 1,
        }
    )


@pytest.fixture
def receiver() -> Iterator[SlowReceiver]:
    server = SlowReceiver()
    yield server
    server.close()


def started_job(client: Client, url: str, tenant: str) -> tuple[str, str, str]:
    """A job whose ``started`` event is to be delivered to ``url``: (job id, event id, event at)."""
    job = client.submit(REQUEST, webhook=Webhook(url, ("started",)), tenant=tenant)
    client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
    event = next(e for e in client.store.events(job.id) if e["type"] == "job.started")
    return job.id, event["event_id"], str(event["at"])


def test_a_receiver_that_drips_its_answer_is_held_to_the_delivery_deadline(settings, receiver):
    with Client(settings) as client:
        job_id, event_id, at = started_job(client, f"{receiver.url}/drip", "t1")
        deliverer = Deliverer(settings, client.store.client)
        started = time.monotonic()
        result = deliverer.deliver(job_id, event_id, "job.started", at, attempt=1)
        took = time.monotonic() - started
    assert result.outcome == RETRYING and "timed out" in (result.error or ""), result
    assert took < 2.5


def test_one_tenants_slow_endpoints_hold_at_most_its_share_of_the_threads(settings, receiver):
    with Client(settings) as client:
        held = started_job(client, f"{receiver.url}/hold", "t1")
        same_tenant = started_job(client, f"{receiver.url}/fast", "t1")
        other_tenant = started_job(client, f"{receiver.url}/fast", "t2")
        deliverer = Deliverer(settings.model_copy(update={"webhook_timeout_s": 10.0}), client.store.client)
        results: list[str] = []
        first = threading.Thread(
            target=lambda: results.append(deliverer.deliver(*held[:2], "job.started", held[2], 1).outcome)
        )
        first.start()
        assert receiver.held.wait(10)

        # t1 is at its bound of 1: its next delivery is deferred, not dropped; t2's goes through.
        deferred = deliverer.deliver(*same_tenant[:2], "job.started", same_tenant[2], 1)
        assert (deferred.outcome, deferred.retry_in_s) == (DEFERRED, 1.0)
        assert deliverer.deliver(*other_tenant[:2], "job.started", other_tenant[2], 1).outcome == DELIVERED

        receiver.release.set()
        first.join(10)
        assert results == [DELIVERED]
        # The slot is free again: the deferred delivery goes through on its next try.
        assert deliverer.deliver(*same_tenant[:2], "job.started", same_tenant[2], 1).outcome == DELIVERED


def test_the_webhook_worker_gives_one_tenants_slow_endpoint_only_its_share_of_threads(
    settings, receiver, start_worker
):
    """Through the webhook worker process (two threads, a bound of one per tenant): t1's three
    deliveries go to an endpoint that holds every request; one is held, the others are deferred,
    and t2's delivery goes through on the worker's other thread meanwhile. Once the endpoint
    answers, t1's deferred deliveries are made too.

    Catches a worker whose threads do not share the bound (no bound, or one counted per thread or
    per task): t1 would hold both threads, and t2's delivery would wait for t1's endpoint."""
    settings = settings.model_copy(update={"webhook_concurrency": 2, "webhook_timeout_s": 10.0})
    start_worker(settings, module="worker.webhooks")
    with Client(settings) as client:
        slow = [started_job(client, f"{receiver.url}/hold", "t1")[0] for _ in range(3)]

        def outcomes(job_id: str) -> list[str]:
            return [entry["outcome"] for entry in delivery_log(client.store.client, client.keys, job_id)]

        # One of t1's deliveries is held; the other two were deferred for want of a slot.
        assert receiver.held.wait(30)
        wait_for(
            lambda: sum(DEFERRED in outcomes(j) for j in slow) == 2, 30, "t1's other deliveries deferred"
        )
        other = started_job(client, f"{receiver.url}/fast", "t2")[0]
        wait_for(lambda: outcomes(other) == [DELIVERED], 30, "t2's delivery made while t1's is held")
        with receiver.lock:
            assert receiver.others == [("/fast", 1)]  # t2's came while /hold held t1's one
            assert receiver.most_held == 1

        receiver.release.set()
        wait_for(lambda: all(outcomes(j)[-1:] == [DELIVERED] for j in slow), 60, "t1's deliveries made")
        assert sorted(outcomes(j).count(DELIVERED) for j in slow) == [1, 1, 1]
    assert receiver.most_held == 1


def test_a_tenants_slow_name_lookups_hold_only_its_own_slots(settings, receiver, monkeypatch):
    """The tenant's slot is taken before the name lookup: a tenant whose webhook host resolves
    slowly holds its share of the threads, and its next delivery is deferred, not stuck in DNS too."""
    armed = threading.Event()  # slow only once the jobs are submitted (submit checks the name too)
    looking_up = threading.Event()
    answer = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def slow_dns(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "slow-dns.test":  # the one name whose name server is slow
            if armed.is_set():
                looking_up.set()
                answer.wait(10)
            host = "127.0.0.2"
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    port = receiver.httpd.server_address[1]
    with Client(settings) as client:
        slow = started_job(client, f"http://slow-dns.test:{port}/fast", "t1")
        same_tenant = started_job(client, f"{receiver.url}/fast", "t1")
        other_tenant = started_job(client, f"{receiver.url}/fast", "t2")
    deliverer = Deliverer(settings, client.store.client)
    armed.set()
    results: list[str] = []
    first = threading.Thread(
        target=lambda: results.append(deliverer.deliver(*slow[:2], "job.started", slow[2], 1).outcome)
    )
    first.start()
    try:
        assert looking_up.wait(10)
        started = time.monotonic()
        deferred = deliverer.deliver(*same_tenant[:2], "job.started", same_tenant[2], 1)
        assert deferred.outcome == DEFERRED and time.monotonic() - started < 2
        assert deliverer.deliver(*other_tenant[:2], "job.started", other_tenant[2], 1).outcome == DELIVERED
    finally:
        answer.set()
        first.join(10)
    assert results == [DELIVERED]


def test_deferral_backs_off_and_ends(settings, receiver):
    """Deferred deliveries wait 1 s doubling to a cap, and past FLEET_WEBHOOK_MAX_DEFERRALS a
    deferral uses up an attempt, so a delivery that never gets a slot still ends."""
    assert [defer_s(n) for n in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    settings = settings.model_copy(update={"webhook_max_deferrals": 3, "webhook_max_attempts": 2})
    with Client(settings) as client:
        job = started_job(client, f"{receiver.url}/fast", "t1")
    deliverer = Deliverer(settings, client.store.client)
    assert deliverer._take_slot("t1")  # the tenant's one slot is busy for the whole test
    try:
        at_edge = deliverer.deliver(*job[:2], "job.started", job[2], attempt=1, deferred=2)
        assert (at_edge.outcome, at_edge.retry_in_s) == (DEFERRED, 4.0)
        past = deliverer.deliver(*job[:2], "job.started", job[2], attempt=1, deferred=3)
        assert past.outcome == RETRYING and "deferred 3 times" in (past.error or "")
        last = deliverer.deliver(*job[:2], "job.started", job[2], attempt=2, deferred=3)
        assert last.outcome == FAILED and "gave up after 2 attempts" in (last.error or "")
    finally:
        deliverer._free_slot("t1")

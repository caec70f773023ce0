"""Expiry of queued jobs no worker takes: real Redis, a real API process or real worker processes
sweeping, and a later worker that finds the expired job's message."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from localfleet.process import ApiProcess, WorkerProcess
from producer.client import Client
from routing.jobs import lifecycle
from routing.jobs.events import Webhook
from routing.jobs.record import JobStatus
from routing.settings import Settings, Tenant
from tests.integration.test_api import SMALL, settings  # noqa: F401  (the S3 + tenants settings fixture)
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.integration

B = {"Authorization": "Bearer key-b"}  # tenant b may have one unfinished job


def wait_until(check: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


@pytest.fixture
def quick(settings: Settings) -> Settings:  # noqa: F811
    return settings.model_copy(update={"max_wait_s": 2, "expiry_sweep_interval_s": 0.5})


@pytest.fixture
def api(quick: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    with (
        ApiProcess(quick, tmp_path / "api.log").wait_ready(60) as process,
        httpx.Client(base_url=process.url, timeout=30) as http,
    ):
        yield http


def test_a_job_no_worker_takes_expires_frees_its_slot_and_a_later_worker_drops_it(
    api, quick: Settings, start_worker, redis_client
):
    job = api.post("/v1/jobs", json=SMALL, headers=B).json()
    assert api.post("/v1/jobs", json=SMALL, headers=B).status_code == 429  # b is at its limit

    # No worker of any class runs: the API process's sweep expires it.
    wait_until(lambda: api.get(f"/v1/jobs/{job['id']}", headers=B).json()["status"] == "failed")
    record = api.get(f"/v1/jobs/{job['id']}", headers=B).json()
    assert record["error"]["type"] == "expired"
    assert (record["attempt"], record["started_at"], record["outputs"]) == (0, None, [])
    # Not before max_wait_s: the sweep runs every 0.5 s, so it expired within a sweep of it.
    assert 2 < record["finished_at"] - record["created_at"] < 2 + 0.5 + 5
    with Client(quick) as fleet:
        assert [e["type"] for e in fleet.store.events(job["id"])] == ["job.queued", "job.failed"]
        assert redis_client.scard(fleet.keys.tenant_in_flight("b")) == 0
    again = api.post("/v1/jobs", json=SMALL, headers=B)
    assert again.status_code == 201  # the slot is free again
    api.delete(f"/v1/jobs/{again.json()['id']}", headers=B)

    # The expired job's message is still in the queue (the canceled job's left it with the
    # cancel); a worker that comes later drops it, and the queue drains.
    [left] = redis_client.lrange(job["queue"], 0, -1)
    assert job["id"] in left.decode()
    worker = start_worker(quick)
    wait_until(lambda: f"job {job['id']}: 'skipped (failed)'" in worker.log())
    wait_until(lambda: redis_client.llen(job["queue"]) == 0, timeout_s=30)
    assert api.get(f"/v1/jobs/{job['id']}", headers=B).json() == record


def test_a_worker_of_another_class_expires_the_job_and_its_webhook_is_delivered(
    fleet_settings: Settings, start_worker, tmp_path: Path, redis_client
):
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    sweeping = fleet_settings.model_copy(
        update={
            "max_wait_s": 2,
            "expiry_sweep_interval_s": 0.5,
            "heartbeat_ttl_s": 3,  # the liveness loop, which sweeps, runs every 1 s
            "tenants": {"t": Tenant(api_keys=["key-t"], webhook_secret=secret)},
            "url_allow_cidrs": ["127.0.0.2/32"],
        }
    )
    receiver = Receiver(secret)
    deliveries = WorkerProcess(sweeping, tmp_path / "webhooks.log", module="worker.webhooks")
    try:
        deliveries.wait_ready(timeout_s=60)
        start_worker(sweeping)  # gpu16; qwen-image is a gpu80 job, and no gpu80 worker runs
        with Client(sweeping) as fleet:
            hook = Webhook(receiver.url("/hook"), ("failed",))
            job = fleet.submit({"model": "qwen-image", "prompt": "a fox"}, webhook=hook, tenant="t")

            wait_until(lambda: fleet.get(job.id).status is JobStatus.FAILED)
            assert fleet.get(job.id).error.type.value == "expired"
            assert redis_client.scard(fleet.keys.tenant_in_flight("t")) == 0
            assert redis_client.zscore(fleet.keys.waiting, job.id) is None
        wait_until(lambda: receiver.hits("/hook"))
        [delivery] = receiver.hits("/hook")
        assert delivery.verified
        body = json.loads(delivery.body)
        assert (body["type"], body["data"]["id"], body["data"]["error"]["type"]) == (
            "job.failed",
            job.id,
            "expired",
        )
    finally:
        deliveries.stop()
        receiver.close()


def test_the_sweep_expires_queued_jobs_past_max_wait_s_and_nothing_else(client: Client):
    old = client.submit(SMALL, tenant="t", max_in_flight=4).id
    running = client.submit(SMALL, tenant="t").id
    canceled = client.submit(SMALL, tenant="t").id
    client.store.move(running, lifecycle.claim(client.store.get(running), "w", time.time()))
    client.cancel(canceled)
    time.sleep(1.2)
    young = client.submit(SMALL, tenant="t").id

    assert client.store.expire_queued(max_wait_s=5) == []  # none has waited that long
    assert client.store.expire_queued(max_wait_s=1) == [old]
    assert client.store.expire_queued(max_wait_s=1) == []  # once only

    assert client.get(old).error.type.value == "expired"
    assert client.get(young).status is JobStatus.QUEUED
    assert client.get(running).status is JobStatus.RUNNING
    assert client.get(canceled).status is JobStatus.CANCELED
    in_flight = client.keys.tenant_in_flight("t")
    assert {m.decode() for m in client.store.client.smembers(in_flight)} == {running, young}
    # The young job is expired once it is older than max_wait_s.
    time.sleep(1.2)
    assert client.store.expire_queued(max_wait_s=1) == [young]

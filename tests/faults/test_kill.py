"""Workers that die: the whole worker killed with SIGKILL mid-job, a job that kills its worker on
every attempt, and a worker killed holding a message whose job it never claimed."""

from __future__ import annotations

import json
import time

import pytest

from producer.client import Client
from routing.celery_config import UNACKED_KEY
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.conftest import MAX_ATTEMPTS
from tests.faults.harness import event_types, kill_group, small_request, wait_broker_idle, wait_for, wait_warm
from worker import held

pytestmark = pytest.mark.integration


def test_kill_9_of_the_whole_worker_mid_job_redelivers_it_once(client: Client, start_worker, fleet_settings):
    first = start_worker()
    wait_warm(first)
    job = client.submit(small_request("killed mid-job fault:sleep=0.4", steps=8))
    wait_for(lambda: client.get(job.id).step >= 2, 60, "job at step 2 on the first worker")
    victim = client.get(job.id).worker

    kill_group(first)  # main process and pool child at once: nothing of it can clean up
    assert client.get(job.id).status is JobStatus.RUNNING  # as the dead worker left it
    second = start_worker()
    record = job.wait(timeout_s=120)

    assert record.status is JobStatus.SUCCEEDED, record.error
    assert record.attempt == 2
    assert record.worker != victim and str(second.proc.pid) not in (victim or "")
    assert record.handed_back == f"worker {victim} died"
    # One output object, one completion: the redelivery did not add a second set.
    keys = LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/")
    assert keys == [f"jobs/{job.id}/attempt-2/output-0.png"]
    assert event_types(client.store, job.id) == [
        "job.queued", "job.started", "job.queued", "job.started", "job.succeeded"
    ]  # fmt: skip
    assert client.store.client.llen(client.keys.dead_letters) == 0


def test_job_that_kills_its_worker_every_time_is_dead_lettered_after_max_attempts(
    client: Client, start_worker
):
    worker = start_worker()
    wait_warm(worker)
    killer = client.submit(small_request("kills its worker fault:kill-at=1", steps=4))
    normal = client.submit(small_request("queued behind it"))

    record = killer.wait(timeout_s=180)
    assert record.status is JobStatus.FAILED
    assert record.error.type == "too_many_attempts"
    assert record.attempt == MAX_ATTEMPTS
    assert event_types(client.store, killer.id).count("job.started") == MAX_ATTEMPTS
    assert record.outputs == []
    # The dead letter is written in the same step as the record.
    dead = [json.loads(raw) for raw in client.store.client.lrange(client.keys.dead_letters, 0, -1)]
    assert [(d["id"], d["attempts"]) for d in dead] == [(killer.id, MAX_ATTEMPTS)]
    # Its pool child died once per attempt, and the worker lived on.
    assert worker.log().count("fault adapter: killing pool process") == MAX_ATTEMPTS
    assert worker.proc.poll() is None

    # The job behind it was not held up for good.
    assert normal.wait(timeout_s=120).status is JobStatus.SUCCEEDED
    # Extra copies of the killer's message (the broker's requeue and the reaper's) are dropped:
    # every one queued (the reaper hands back running jobs only, so none after it failed) has
    # been taken and run to its end once the broker is idle.
    wait_broker_idle(client.store.client)
    assert client.get(killer.id).status is JobStatus.FAILED
    assert event_types(client.store, killer.id).count("job.started") == MAX_ATTEMPTS
    assert client.store.client.llen(client.keys.dead_letters) == 1


def test_a_message_a_killed_worker_took_but_never_claimed_is_given_back_at_once(
    client: Client, start_worker, fault_redis, fleet_settings
):
    """A worker takes a message from the queue as soon as its main process is up, and holds it
    while its pool child is still starting (importing torch, loading warm_models: seconds here,
    minutes with real weights). Killed in that window, the job was never claimed: its record is
    queued and the only copy of its message sits in Kombu's unacknowledged set, which the broker
    would restore only after the visibility timeout (600 s, the default, kept here). The next
    worker's reaper gives it back at once, and it runs once.

    Catches a reaper that does not give back a dead worker's held messages (the job waits out the
    visibility timeout, far past the bound here), and one that gives one back twice (a copy left
    to run the job again). Racing reapers: tests/integration/test_held.py."""
    assert fleet_settings.visibility_timeout_s == 600
    redis = fault_redis.client()
    job = client.submit(small_request("received, never claimed"))
    tag = json.loads(redis.hget(client.keys.job(job.id), "queued_message"))["properties"]["delivery_tag"]
    first = start_worker()

    def holder_of_tag() -> str | None:
        return next(
            (h for h in held.holders(redis, client.keys) if redis.sismember(client.keys.held(h), tag)), None
        )

    holder = wait_for(holder_of_tag, 60, "message taken and recorded as held")
    kill_group(first)
    assert "loaded z-image-turbo" not in first.log()  # killed while its pool child was warming up
    assert redis.llen("gpu16") == 0 and redis.hexists(UNACKED_KEY, tag)  # held by the dead worker
    assert client.get(job.id).status is JobStatus.QUEUED

    killed_at = time.monotonic()
    second = start_worker()
    record = job.wait(timeout_s=120)
    recovered_s = time.monotonic() - killed_at

    assert record.status is JobStatus.SUCCEEDED, record.error
    # The bound is the claim: a worker start and one small job, nowhere near the 600 s timeout.
    assert recovered_s < 120, recovered_s
    assert f"gave back the messages dead worker {holder} held: {tag}" in second.log()
    # Run once: one claim, one output, and no copy of the message left anywhere to run it again.
    assert record.attempt == 1
    assert event_types(client.store, job.id) == ["job.queued", "job.started", "job.succeeded"]
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == [
        f"jobs/{job.id}/attempt-1/output-0.png"
    ]
    wait_for(lambda: not redis.hexists(UNACKED_KEY, tag), 30, "the given-back copy acknowledged")
    assert redis.hlen(UNACKED_KEY) == 0 and redis.llen("gpu16") == 0
    assert holder not in held.holders(redis, client.keys)
    assert second.log().count(f"run_job[{job.id}] received") == 1

"""Workers that die: the whole worker killed with SIGKILL mid-job, and a job that kills its worker
on every attempt."""

from __future__ import annotations

import json

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.conftest import MAX_ATTEMPTS
from tests.faults.harness import event_types, kill_group, small_request, wait_broker_idle, wait_for, wait_warm

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


def test_kill_9_of_a_worker_holding_a_message_it_has_not_started_does_not_lose_the_job(
    client: Client, start_worker, fault_redis, fleet_settings
):
    # A worker takes a message from the queue as soon as its main process is up, and holds it
    # while its pool child is still starting (importing torch, loading warm_models: seconds here,
    # minutes with real weights). Killed in that window, the job was never claimed: its record
    # is queued, no reaper looks at it, and the only copy of its message sits in Kombu's
    # unacknowledged set until the visibility timeout brings it back (10 min by default; 30 s
    # here).
    job = client.submit(small_request("received, never claimed"))
    first = start_worker()
    wait_for(lambda: f"run_job[{job.id}] received" in first.log(), 60, "message received")
    assert "loaded z-image-turbo" not in first.log()  # the pool child is still warming up
    kill_group(first)
    redis = fault_redis.client()
    assert redis.llen("gpu16") == 0 and redis.hlen("unacked") == 1  # held by the dead worker
    assert client.get(job.id).status is JobStatus.QUEUED

    second = start_worker(fleet_settings.model_copy(update={"visibility_timeout_s": 30}))
    wait_warm(second)
    record = job.wait(timeout_s=120)
    assert record.status is JobStatus.SUCCEEDED

"""A second copy of a job's message while the job runs (what Kombu's restore does once the
visibility timeout runs out on a long job), and after it finished: both are dropped."""

from __future__ import annotations

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.harness import event_types, small_request, wait_for, wait_warm
from worker.liveness import hand_back

pytestmark = pytest.mark.integration


def test_second_copy_of_a_running_jobs_message_is_dropped(client: Client, start_worker, fleet_settings):
    # visibility_timeout is max_wait_s + max_run_s + 15 min, too long to wait out in a test:
    # push the copy a restore would push, onto the queue, while the job runs.
    workers = [start_worker(), start_worker()]
    for worker in workers:
        wait_warm(worker)
    job = client.submit(small_request("a long one fault:sleep=0.3", steps=12))
    wait_for(lambda: client.get(job.id).step >= 1, 60, "job running")
    owner = client.get(job.id).worker

    queue, message = client.store.messages.run_job(job.id, "gpu16")
    client.store.client.lpush(queue, message)

    # The idle worker takes the copy and drops it: the job is alive on the other.
    wait_for(lambda: any(f"'skipped (running on {owner})'" in w.log() for w in workers), 30, "copy skipped")
    record = job.wait(timeout_s=60)
    assert record.status is JobStatus.SUCCEEDED, record.error
    assert record.attempt == 1 and record.worker == owner
    assert client.store.client.llen("gpu16") == 0

    # A copy after the end is dropped too.
    client.store.client.lpush(queue, message)
    wait_for(lambda: any("'skipped (succeeded)'" in w.log() for w in workers), 30, "late copy skipped")

    assert client.get(job.id).attempt == 1
    assert event_types(client.store, job.id) == ["job.queued", "job.started", "job.succeeded"]
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == [
        f"jobs/{job.id}/attempt-1/output-0.png"
    ]
    assert sum(w.log().count(f"run_job[{job.id}] received") for w in workers) == 3


def test_second_copy_on_the_same_worker_after_the_job_is_dropped(client: Client, start_worker):
    worker = start_worker()
    wait_warm(worker)
    job = client.submit(small_request("one worker, two copies fault:sleep=0.2", steps=6))
    wait_for(lambda: client.get(job.id).step >= 1, 60, "job running")
    owner = client.get(job.id).worker
    queue, message = client.store.messages.run_job(job.id, "gpu16")
    client.store.client.lpush(queue, message)  # waits behind the running job (prefetch 1)

    assert job.wait(timeout_s=60).status is JobStatus.SUCCEEDED
    # The copy is taken once the pipeline call returns: while the finisher still stores the
    # job (dropped as running on this worker) or after it succeeded. Either drop is right.
    drops = ("'skipped (succeeded)'", f"'skipped (running on {owner})'")
    wait_for(lambda: any(drop in worker.log() for drop in drops), 30, "second copy dropped")
    assert event_types(client.store, job.id).count("job.started") == 1
    assert client.get(job.id).attempt == 1


def test_job_handed_back_while_its_worker_still_runs_it_is_not_lost(client: Client, start_worker):
    # What the reaper does when it wrongly thinks a worker dead (its heartbeat key expired during
    # a Redis outage, a network partition, a stalled process): the job goes back to its queue
    # while the worker still runs it. The worker must let it go, not end it.
    worker = start_worker()
    wait_warm(worker)
    job = client.submit(small_request("misjudged fault:sleep=0.3", steps=10))
    wait_for(lambda: client.get(job.id).step >= 2, 60, "job at step 2")
    owner = client.get(job.id).worker

    assert hand_back(client.store, job.id, owner, f"worker {owner} died")

    record = job.wait(timeout_s=60)
    assert record.status is JobStatus.SUCCEEDED, (record.status, record.error, worker.log()[-1500:])
    assert record.attempt == 2
    assert not record.cancel_requested
    assert event_types(client.store, job.id).count("job.canceled") == 0

"""Cancel under the fault settings (short heartbeat, the fault adapter, the suite's own Redis):
a queued job never starts; a running job stops at its next step. The integration suite
(tests/integration/test_cancel.py) covers cancel in depth; a cancel asked just before the job
runs out of memory, is handed back or is killed: tests/faults/test_cancel_outlives.py, where the
fault adapter waits for the cancel (no window a loaded machine could miss)."""

from __future__ import annotations

import os
import signal

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.harness import event_types, kill_group, small_request, wait_broker_idle, wait_for, wait_warm

pytestmark = pytest.mark.integration

SLOW = small_request("slow fault:sleep=0.3", steps=30)


def test_cancel_queued_and_running_jobs(client: Client, start_worker, fleet_settings, fault_redis):
    worker = start_worker()
    wait_warm(worker)
    running = client.submit(SLOW)
    wait_for(lambda: client.get(running.id).step >= 2, 60, "running job at step 2")
    queued = client.submit(small_request("never runs"))

    assert client.cancel(queued.id).status is JobStatus.CANCELED
    canceled_at_step = client.cancel(running.id).step
    record = running.wait(timeout_s=30)

    assert record.status is JobStatus.CANCELED and record.cancel_requested
    assert canceled_at_step <= record.step <= canceled_at_step + 2 < SLOW["steps"]
    assert record.outputs == []
    assert event_types(client.store, running.id)[-1] == "job.canceled"

    # The canceled job's message left its queue with the cancel: no worker ever receives it.
    wait_broker_idle(fault_redis.client())  # had a worker taken it, it would have run to its end
    assert f"run_job[{queued.id}] received" not in worker.log()
    record = client.get(queued.id)
    assert record.status is JobStatus.CANCELED
    assert record.started_at is None and record.attempt == 0 and record.step == 0
    assert event_types(client.store, queued.id, progress=True) == ["job.queued", "job.canceled"]
    storage = LocalStorage(fleet_settings.storage_dir)
    assert storage.list(f"jobs/{queued.id}/") == [] and storage.list(f"jobs/{running.id}/") == []
    # And goes on with the next.
    assert client.submit(small_request("after")).wait(timeout_s=60).status is JobStatus.SUCCEEDED


def test_a_cancel_asked_just_before_the_worker_is_killed_ends_the_job_canceled(
    client: Client, start_worker, fleet_settings
):
    first = start_worker()
    wait_warm(first)
    job = client.submit(small_request("canceled, then its worker dies fault:sleep=0.4", steps=12))
    wait_for(lambda: client.get(job.id).step >= 2, 60, "job at step 2")
    # Stopped first, so that it never reaches the step where it would see the cancel.
    os.killpg(first.proc.pid, signal.SIGSTOP)
    assert client.store.cancel(job.id) is JobStatus.RUNNING
    kill_group(first)

    second = start_worker()  # its reaper finds the dead worker's job
    record = wait_for(
        lambda: (r := client.get(job.id)).status is not JobStatus.RUNNING and r, 60, "job ended"
    )
    assert record.status is JobStatus.CANCELED and record.cancel_requested
    assert record.attempt == 1 and record.outputs == []
    assert event_types(client.store, job.id) == ["job.queued", "job.started", "job.canceled"]
    # The message the dead worker held is given back by the reaper too; the second worker drops
    # that copy: nothing runs the job again.
    wait_for(lambda: f"job {job.id}: '" in second.log(), 60, "the given-back copy's outcome")
    assert second.log().split(f"job {job.id}: '")[1].split("'")[0] in ("skipped (canceled)", "canceled")
    assert client.get(job.id).status is JobStatus.CANCELED
    assert event_types(client.store, job.id) == ["job.queued", "job.started", "job.canceled"]
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == []

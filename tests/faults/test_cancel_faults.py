"""Cancel under the fault settings (short heartbeat, the fault adapter, the suite's own Redis):
a queued job never starts; a running job stops at its next step. The integration suite
(tests/integration/test_cancel.py) covers cancel in depth."""

from __future__ import annotations

import time

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.store import JobStatus
from tests.faults.harness import event_types, small_request, wait_for, wait_warm

pytestmark = pytest.mark.integration

SLOW = small_request("slow fault:sleep=0.3", steps=30)


def test_cancel_queued_and_running_jobs(client: Client, start_worker, fleet_settings, fault_redis):
    worker = start_worker()
    wait_warm(worker)
    running = client.submit(SLOW)
    wait_for(lambda: client.status(running.id).step >= 2, 60, "running job at step 2")
    queued = client.submit(small_request("never runs"))

    assert client.cancel(queued.id).status is JobStatus.CANCELED
    canceled_at_step = client.cancel(running.id).step
    record = running.wait(timeout_s=30)

    assert record.status is JobStatus.CANCELED and record.cancel_requested
    assert canceled_at_step <= record.step <= canceled_at_step + 2 < SLOW["steps"]
    assert record.outputs == []
    assert event_types(client.store, running.id)[-1] == "job.canceled"

    # The worker takes the canceled job's message and drops it without running it.
    wait_for(lambda: f"run_job[{queued.id}] received" in worker.log(), 30, "queued job's message taken")
    wait_for(lambda: fault_redis.client().llen("gpu16") == 0, 30, "queue drained")
    time.sleep(0.5)
    record = client.status(queued.id)
    assert record.status is JobStatus.CANCELED
    assert record.started_at is None and record.attempt == 0 and record.step == 0
    assert event_types(client.store, queued.id, progress=True) == ["job.queued", "job.canceled"]
    storage = LocalStorage(fleet_settings.storage_dir)
    assert storage.list(f"jobs/{queued.id}/") == [] and storage.list(f"jobs/{running.id}/") == []
    # And goes on with the next.
    assert client.submit(small_request("after")).wait(timeout_s=60).status is JobStatus.SUCCEEDED

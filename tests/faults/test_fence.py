"""A worker thought dead that goes on: stopped (SIGSTOP) long enough for its heartbeat to expire,
the reaper of a second worker hands its job back and the second worker runs it again. When the
first one wakes (SIGCONT), it can write nothing into the job: no progress into the new run, and
none of its bytes ever become the job's outputs."""

from __future__ import annotations

import os
import signal

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from testkit.storage import SLOW_WORKER
from tests.faults.harness import event_types, small_request, wait_for, wait_log, wait_warm

pytestmark = pytest.mark.integration

REDELIVERED = ["job.queued", "job.started", "job.queued", "job.started", "job.succeeded"]


def _stop(worker) -> None:
    os.killpg(worker.proc.pid, signal.SIGSTOP)  # main process and pool child: its heartbeat stops


def _wake(worker) -> None:
    os.killpg(worker.proc.pid, signal.SIGCONT)


def test_a_worker_that_wakes_after_its_job_ran_again_cannot_touch_its_outputs(
    client: Client, start_worker, fleet_settings
):
    stale = start_worker(module=SLOW_WORKER, FAULT_STORE_PUT_S="4")
    wait_warm(stale)
    job = client.submit(small_request("stored by a worker that is stopped mid-put"))
    wait_log(stale, f"slow store: put jobs/{job.id}/", timeout_s=60)
    stale_owner = client.get(job.id).worker
    _stop(stale)
    try:
        start_worker()  # a plain store; its reaper finds the stopped worker's heartbeat gone
        record = job.wait(timeout_s=120)
        assert record.status is JobStatus.SUCCEEDED, record.error
        assert record.attempt == 2 and record.worker != stale_owner
        [output] = record.outputs
        path = fleet_settings.storage_dir / output.key
        written = path.stat()
        data = path.read_bytes()
    finally:
        _wake(stale)

    # The stopped put goes on and returns; the stale run's finish is then refused.
    wait_log(stale, f"job {job.id} is succeeded; it cannot become succeeded", timeout_s=60)
    storage = LocalStorage(fleet_settings.storage_dir)
    wait_for(lambda: storage.list(f"jobs/{job.id}/") == [output.key], 10, "only the second run's object left")

    after = client.get(job.id)
    assert (after.status, after.attempt, after.worker, after.outputs, after.finished_at) == (
        record.status, record.attempt, record.worker, record.outputs, record.finished_at
    )  # fmt: skip
    # The output object is the second run's, untouched; nothing of the stale run is left.
    assert output.key == f"jobs/{job.id}/attempt-2/output-0.png"
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert path.read_bytes() == data
    assert event_types(client.store, job.id) == REDELIVERED


def test_a_worker_that_wakes_while_its_job_runs_again_stops_at_its_next_step(
    client: Client, start_worker, fleet_settings
):
    stale = start_worker()
    wait_warm(stale)
    job = client.submit(small_request("stopped mid-generation fault:sleep=0.5", steps=12))
    wait_for(lambda: client.get(job.id).step >= 2, 60, "job at step 2 on the first worker")
    stale_owner = client.get(job.id).worker
    _stop(stale)
    try:
        start_worker()
        rerun = wait_for(
            lambda: (r := client.get(job.id)).attempt == 2 and r.step >= 1 and r,
            120,
            "the job running again",
        )
    finally:
        _wake(stale)

    # Its next step is refused: it stops while the new run is still going, without a write.
    wait_log(stale, f"job {job.id} was handed on while this worker ran it", timeout_s=10)
    during = client.get(job.id)
    assert during.status is JobStatus.RUNNING and during.worker == rerun.worker != stale_owner

    record = job.wait(timeout_s=60)
    assert record.status is JobStatus.SUCCEEDED and record.attempt == 2 and record.worker == rerun.worker
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == [
        f"jobs/{job.id}/attempt-2/output-0.png"
    ]
    assert event_types(client.store, job.id) == REDELIVERED
    # The second run's steps, 1 to 12, were reported by it alone.
    steps = [int(e["step"]) for e in client.store.events(job.id) if e["type"] == "job.progress"]
    assert steps[len(steps) - 1 - steps[::-1].index(1) :] == list(range(1, 13))

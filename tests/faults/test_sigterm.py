"""SIGTERM mid-job (a deploy, a scale-in, a spot notice): the worker hands its job back at the next
step, a worker that is already running takes it at once, and the stopped worker exits."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.harness import event_types, small_request, wait_for, wait_warm
from worker.liveness import pid_of

# alone: the hand-back is timed (tests/parallel.py).
pytestmark = [pytest.mark.integration, pytest.mark.alone]

SLOW = small_request("stopped mid-job fault:sleep=0.4", steps=12)


def _main_pid_of(worker_name: str) -> int:
    """The main process of the pool child that ``worker_name`` names."""
    child = pid_of(worker_name)
    with open(f"/proc/{child}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("PPid:"))


def _running_on_one_of_two(client: Client, start_worker):
    """Two warm workers and a slow job running on one of them: (that one, the other, job, the
    job's worker name)."""
    workers = [start_worker(), start_worker()]
    for worker in workers:
        wait_warm(worker)
    job = client.submit(SLOW)
    wait_for(lambda: client.get(job.id).step >= 2, 60, "job at step 2")
    record = client.get(job.id)
    assert record.status is JobStatus.RUNNING and record.step < SLOW["steps"]
    first = next(w for w in workers if w.proc.pid == _main_pid_of(record.worker))
    second = next(w for w in workers if w is not first)
    return first, second, job, record.worker


@pytest.mark.parametrize("how", ["main process", "process group"])
def test_sigterm_mid_job_hands_it_back_at_once_and_another_worker_finishes_it(
    client: Client, start_worker, fleet_settings, how
):
    # "main process": what Kubernetes and docker stop send (PID 1 of the container): the pool
    # child sees the drain mark at its next step and hands the job back itself.
    # "process group": a supervisor that signals the whole group (systemd's default
    # KillMode, dumb-init, tini -g, ServiceProcess.stop): the pool child dies of the SIGTERM
    # mid-step, and the job comes back through the reaper of the other worker instead (at once
    # on one host, where the process table shows the child gone; after heartbeat_ttl_s across hosts).
    first, second, job, first_owner = _running_on_one_of_two(client, start_worker)

    stopped_at = time.monotonic()
    if how == "main process":
        first.signal(signal.SIGTERM)
    else:
        os.killpg(first.proc.pid, signal.SIGTERM)

    # Handed back within a couple of seconds (the next step, or the other worker's reaper seeing
    # the killed child's pid gone or a zombie), then running on the second worker.
    record = wait_for(lambda: (r := client.get(job.id)).handed_back and r, 10, "job handed back")
    handed_back_s = time.monotonic() - stopped_at
    reason = "shut down" if how == "main process" else "died"
    assert record.handed_back == f"worker {first_owner} {reason}"
    assert record.status in (JobStatus.QUEUED, JobStatus.RUNNING)
    wait_for(
        lambda: (r := client.get(job.id)).status is not JobStatus.QUEUED and r.worker != first_owner,
        5,
        "job running on the second worker",
    )

    # The stopped worker exits, promptly: it is not waiting for the job to end.
    try:
        first.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the stopped worker did not exit:\n{first.log()[-3000:]}")
    assert first.proc.returncode == 0, first.log()[-3000:]

    final = job.wait(timeout_s=60)
    assert final.status is JobStatus.SUCCEEDED, final.error
    assert final.attempt == 2
    assert final.worker != first_owner
    assert _main_pid_of(final.worker) == second.proc.pid  # the worker that was already running
    # A step, or a reaper's pass: never a heartbeat TTL, let alone a visibility timeout.
    assert handed_back_s < 5, handed_back_s
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == [
        f"jobs/{job.id}/attempt-2/output-0.png"
    ]
    assert event_types(client.store, job.id) == [
        "job.queued", "job.started", "job.queued", "job.started", "job.succeeded"
    ]  # fmt: skip

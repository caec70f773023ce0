"""A job that runs out of time is failed (``time_limit``), never redelivered: it would only run
out of time again.

A worker's limits come from ``max_run_s``: hard ``max_run_s`` (the pool kills the child; the main
process records the failure from the ``task_failure`` signal), soft max(max_run_s - 60, 1)
(SoftTimeLimitExceeded raised inside the job, which records its own failure). The soft test runs
with max_run_s 62 (soft 2 s: room for a normal job afterwards, whose first run in a fresh process
can take most of a second on a small CPU); the hard test with max_run_s 3 (soft 1 s, hard 3 s).
"""

from __future__ import annotations

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.harness import event_types, small_request, wait_broker_idle, wait_log, wait_warm

# alone: the limits are measured in seconds of wall time (tests/parallel.py).
pytestmark = [pytest.mark.integration, pytest.mark.alone]

SOFT_S = 2  # with max_run_s 62
HARD_S = 3  # with max_run_s 3


def _limited_worker(start_worker, fleet_settings, max_run_s: int):
    worker = start_worker(fleet_settings.model_copy(update={"max_run_s": max_run_s}))
    wait_warm(worker)
    return worker


def _not_redelivered(client: Client, job_id: str) -> None:
    """Called once the job has failed and a later job has run: every copy of its message that
    was ever queued (before the later job, which the worker takes after it) has been taken and
    run to its end; the reaper hands back running jobs only, and this one is failed."""
    wait_broker_idle(client.store.client)
    record = client.get(job_id)
    assert record.status is JobStatus.FAILED and record.attempt == 1
    assert event_types(client.store, job_id) == ["job.queued", "job.started", "job.failed"]
    assert client.store.client.llen("gpu16") == 0


def test_soft_time_limit_fails_the_job_without_redelivery(client: Client, start_worker, fleet_settings):
    _limited_worker(start_worker, fleet_settings, max_run_s=SOFT_S + 60)
    job = client.submit(small_request("slow fault:sleep=0.5", steps=20))  # 10 s, limit 2 s

    record = job.wait(timeout_s=60)

    assert record.status is JobStatus.FAILED
    assert record.error.type == "time_limit"
    assert record.error.exception == "SoftTimeLimitExceeded"
    assert record.attempt == 1
    assert SOFT_S - 0.5 <= record.timings["run_s"] < SOFT_S + 5  # the limit counts from the task start
    assert record.step < 20
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == []
    # The worker lives on: its next job runs.
    nxt = client.submit(small_request("next")).wait(timeout_s=60)
    assert nxt.status is JobStatus.SUCCEEDED, nxt.error
    _not_redelivered(client, job.id)


def test_hard_time_limit_fails_the_job_without_redelivery(client: Client, start_worker, fleet_settings):
    limited_worker = _limited_worker(start_worker, fleet_settings, max_run_s=HARD_S)
    # Swallows the soft limit (a pipeline blocked in code that ignores it): only the hard limit,
    # which kills the pool child, ends it.
    job = client.submit(small_request("stuck fault:hold=30"))

    record = job.wait(timeout_s=60)

    assert record.status is JobStatus.FAILED
    assert record.error.type == "time_limit"
    assert record.error.exception == "TimeLimitExceeded"
    assert record.attempt == 1
    assert HARD_S - 0.5 <= record.finished_at - record.started_at < HARD_S + 5
    assert "fault adapter: soft time limit swallowed" in limited_worker.log()
    wait_log(limited_worker, f"Hard time limit ({HARD_S}s) exceeded")
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == []
    # The new pool child takes the next job. It must end at its own soft limit if not
    # succeed: that limit is max(3 - 60, 1) = 1 s, and the first job of a fresh process takes
    # about that on a loaded 2-core CPU (1.0 s measured, cut at the limit; a second job in the
    # same child overran it too at a load average of 11). Requiring success would need a hard
    # limit over 61 s (the soft one is 60 s before it): a minute more of a test nothing runs
    # beside. What it proves: the worker and its new child live on and run jobs to their end.
    wait_warm(limited_worker, count=2)
    nxt = client.submit(small_request("next")).wait(timeout_s=60)
    assert nxt.attempt == 1 and nxt.worker != record.worker
    assert nxt.status is JobStatus.SUCCEEDED or nxt.error.exception == "SoftTimeLimitExceeded", nxt.error
    # Neither the broker (reject on worker lost) nor the reaper (the child is gone) sent the
    # timed-out job round again.
    _not_redelivered(client, job.id)

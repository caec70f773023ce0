"""A job that runs out of time is failed (``time_limit``), never redelivered: it would only run
out of time again.

A worker's limits come from ``max_run_s``: hard ``max_run_s`` (the pool kills the child; the main
process records the failure from the ``task_failure`` signal), soft max(max_run_s - 60, 1)
(SoftTimeLimitExceeded raised inside the job, which records its own failure). The soft test runs
with max_run_s 62 (soft 2 s: room for a normal job afterwards, whose first run in a fresh process
can take most of a second on a small CPU); the hard test with max_run_s 3 (soft 1 s, hard 3 s).
"""

from __future__ import annotations

import time

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.harness import event_types, small_request, wait_log, wait_warm

# alone: the limits are measured in seconds of wall time (tests/parallel.py).
pytestmark = [pytest.mark.integration, pytest.mark.alone]

SOFT_S = 2  # with max_run_s 62
HARD_S = 3  # with max_run_s 3


def _limited_worker(start_worker, fleet_settings, max_run_s: int):
    worker = start_worker(fleet_settings.model_copy(update={"max_run_s": max_run_s}))
    wait_warm(worker)
    return worker


def _not_redelivered(client: Client, job_id: str, seconds: float) -> None:
    time.sleep(seconds)
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
    _not_redelivered(client, job.id, 1)


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
    # Neither the broker (reject on worker lost) nor the reaper (the child is gone) sends it
    # round again once a new pool child is up and reaping.
    wait_warm(limited_worker, count=2)
    _not_redelivered(client, job.id, 2 * 2.0)
    # The new pool child takes the next job. (Its soft limit is 1 s, which the first job of a
    # fresh process may overrun on a small CPU: it must end, not necessarily succeed.)
    nxt = client.submit(small_request("next")).wait(timeout_s=60)
    assert nxt.attempt == 1 and nxt.worker != record.worker
    assert nxt.status is JobStatus.SUCCEEDED or nxt.error.exception == "SoftTimeLimitExceeded"
    assert client.get(job.id).status is JobStatus.FAILED

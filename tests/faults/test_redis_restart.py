"""Redis restarts (the suite's own, append-only file fsynced on every write) while jobs are queued
and running: none is lost, all succeed once, and the workers go on consuming.

Two kinds of restart: a quick one (back within a fraction of a second, well inside the workers'
heartbeat_ttl_s of 2 s), and an outage longer than heartbeat_ttl_s, after which every
heartbeat key has expired."""

from __future__ import annotations

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.harness import event_types, small_request, wait_running_and_queued, wait_warm

pytestmark = pytest.mark.integration

JOBS = 10


@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
def test_redis_restart_with_jobs_queued_and_running_loses_none(
    client: Client, start_worker, fleet_settings, restart_redis, how
):
    _restart_with_jobs_queued_and_running(
        client, start_worker, fleet_settings, restart_redis, how, down_s=0.0, steps=4
    )


def test_redis_outage_longer_than_the_heartbeat_ttl_loses_none(
    client: Client, start_worker, fleet_settings, restart_redis
):
    # Long jobs, so both workers are mid-job when Redis comes back.
    _restart_with_jobs_queued_and_running(
        client, start_worker, fleet_settings, restart_redis, "shutdown", down_s=6.0, steps=16
    )


def _restart_with_jobs_queued_and_running(
    client: Client, start_worker, fleet_settings, restart_redis, how: str, down_s: float, steps: int
) -> None:
    workers = [start_worker(), start_worker()]
    for worker in workers:
        wait_warm(worker)
    jobs = [client.submit(small_request(f"job {i} fault:sleep=0.3", steps=steps)) for i in range(JOBS)]
    states = wait_running_and_queued(client, jobs)

    unreachable_s = restart_redis(how, down_s=down_s)

    records = [j.wait(timeout_s=240) for j in jobs]
    failures = {r.id: (r.status.value, r.error) for r in records if r.status is not JobStatus.SUCCEEDED}
    assert not failures, (states, failures)
    for record in records:
        assert event_types(client.store, record.id).count("job.succeeded") == 1
    storage = LocalStorage(fleet_settings.storage_dir)
    assert len(storage.list("jobs/")) == JOBS
    # Both workers are still consuming: a second batch runs, on both of them.
    after = [client.submit(small_request(f"after {i} fault:sleep=0.2", steps=3)) for i in range(6)]
    after_records = [j.wait(timeout_s=120) for j in after]
    assert all(r.status is JobStatus.SUCCEEDED for r in after_records)
    assert all(w.proc.poll() is None for w in workers)
    assert len({r.worker for r in after_records}) == 2, [r.worker for r in after_records]
    assert unreachable_s < down_s + 10

"""Cancel through the real worker: a queued job never runs; a running one stops at its next step."""

from __future__ import annotations

import time

import pytest

from producer.client import Client
from routing.errors import Conflict, NotFound
from routing.io.storage import LocalStorage
from routing.jobs.events import EventType
from routing.jobs.record import JobStatus
from routing.jobs.store import Deleted
from tests.faults.harness import wait_broker_idle

pytestmark = pytest.mark.integration

# Big enough that the small model takes seconds, so the test can act while it runs.
SLOW = {"model": "z-image-turbo", "prompt": "a slow one", "width": 1024, "height": 1024, "steps": 50}


def _wait_for_step(client: Client, job_id: str, step: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = client.get(job_id)
        if record.step >= step or record.status.is_terminal():
            return
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id} did not reach step {step}")


def test_cancel_a_running_job_stops_it_at_the_next_step(client: Client, start_worker, fleet_settings):
    start_worker()
    job = client.submit(SLOW)
    _wait_for_step(client, job.id, 2)

    canceled_at_step = client.cancel(job.id).step
    record = job.wait(timeout_s=60)

    assert record.status is JobStatus.CANCELED
    assert record.cancel_requested
    # It stopped at the step after the cancel, far from the end.
    assert canceled_at_step <= record.step <= canceled_at_step + 2 < SLOW["steps"]
    assert record.outputs == []
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == []
    assert client.store.events(job.id)[-1]["type"] == EventType.CANCELED.value


def test_cancel_a_queued_job_it_never_runs(client: Client, start_worker, redis_client):
    start_worker()
    busy = client.submit(SLOW)  # holds the only worker
    _wait_for_step(client, busy.id, 1)
    queued = client.submit(
        {"model": "z-image-turbo", "prompt": "never", "width": 64, "height": 64, "steps": 2}
    )

    assert client.cancel(queued.id).status is JobStatus.CANCELED
    client.cancel(busy.id)
    assert busy.wait(timeout_s=60).status is JobStatus.CANCELED

    # The worker took the canceled job's message off the queue and did not run it.
    wait_broker_idle(redis_client)  # had it taken the message, the task would have ended
    record = client.get(queued.id)
    assert record.status is JobStatus.CANCELED
    assert record.started_at is None and record.attempt == 0 and record.step == 0
    assert [e["type"] for e in client.store.events(queued.id)] == ["job.queued", "job.canceled"]
    assert redis_client.llen("gpu16") == 0


def test_cancel_of_a_finished_job_leaves_it_as_it_was(client: Client, start_worker):
    start_worker()
    job = client.submit({"model": "z-image-turbo", "prompt": "done", "width": 64, "height": 64, "steps": 2})
    assert job.wait(timeout_s=120).status is JobStatus.SUCCEEDED

    assert client.cancel(job.id).status is JobStatus.SUCCEEDED


def test_delete_takes_an_ended_jobs_outputs_and_record_and_refuses_one_not_ended(
    client: Client, start_worker, fleet_settings
):
    start_worker()
    small = {"model": "z-image-turbo", "prompt": "done", "width": 64, "height": 64, "steps": 2}
    job = client.submit(small, idempotency_key="once", tenant="t")
    record = job.wait(timeout_s=120)
    busy = client.submit(SLOW, tenant="t")
    _wait_for_step(client, busy.id, 1)
    store = LocalStorage(fleet_settings.storage_dir)
    [output] = record.outputs
    assert store.exists(output.key)

    with pytest.raises(Conflict):  # running: cancel it first
        client.delete(busy.id)
    client.delete(job.id)

    assert not store.exists(output.key)
    with pytest.raises(NotFound):
        client.get(job.id)
    assert [r.id for r in client.list(tenant="t")[0]] == [busy.id]
    # Its idempotency key is free again: the same key makes a new job.
    assert client.submit(small, idempotency_key="once", tenant="t").id != job.id
    # Deleted again (a retry after a lost answer): answered as the first, while its id is
    # remembered (FLEET_DELETED_JOB_TTL_S, its tenant and kind, nothing else).
    client.delete(job.id)
    remembered = client.keys.deleted_job(job.id)
    assert client.deleted(job.id) == Deleted("t", "text-to-image")
    assert client.store.client.hgetall(remembered) == {b"tenant": b"t", b"kind": b"text-to-image"}
    assert (
        fleet_settings.deleted_job_ttl_s - 5
        < client.store.client.ttl(remembered)
        <= fleet_settings.deleted_job_ttl_s
    )
    client.store.client.delete(remembered)  # what its TTL does
    with pytest.raises(NotFound):
        client.delete(job.id)
    client.cancel(busy.id)
    assert busy.wait(timeout_s=60).status is JobStatus.CANCELED
    # At 0 the id is not remembered: a repeat is a NotFound at once.
    with Client(fleet_settings.model_copy(update={"deleted_job_ttl_s": 0})) as forgetful:
        forgetful.delete(busy.id)
        assert forgetful.deleted(busy.id) is None
        with pytest.raises(NotFound):
            forgetful.delete(busy.id)

"""The job record's fence, on the suite's Redis: a worker or attempt that no longer owns a job
writes nothing to it (no progress, no outcome), and a cancel asked for while a job ran survives
whatever becomes of its worker (hand-back, out-of-memory requeue, redelivery).

These make the store's moves with arguments the test chooses, to check everything each one writes
(events, the webhook deliveries queued, the indexes, the record's TTL). The same moves made by
the runner and the reaper in real worker processes: tests/faults/test_cancel_outlives.py (a cancel
just before a SIGTERM hand-back, an escalation, a kill), test_sigterm.py, test_oom.py,
test_kill.py and test_redelivery.py (a worker thought dead that goes on)."""

from __future__ import annotations

import time
import uuid

import pytest

from producer.client import Client
from routing.classes import WEBHOOK_QUEUE
from routing.errors import Conflict, ErrorType, JobError
from routing.jobs import lifecycle
from routing.jobs.events import Webhook
from routing.jobs.lifecycle import Moved
from routing.jobs.messages import task_args
from routing.jobs.record import JobStatus, Output
from routing.jobs.store import NewJob

pytestmark = pytest.mark.integration


def _queued(client: Client) -> str:
    job_id = uuid.uuid4().hex
    store = client.store
    store.create(
        [
            NewJob(
                id=job_id,
                model="z-image-turbo",
                kind="text-to-image",
                request_json="{}",
                queue="gpu16",
                message=store.messages.run_job(job_id, "gpu16"),
                tenant="t",
                webhook=Webhook("https://example.invalid/hook", ("queued", "canceled")),
            )
        ]
    )
    store.client.delete("gpu16")
    return job_id


def _claim(client: Client, job_id: str, worker: str) -> None:
    client.store.move(job_id, lifecycle.claim(client.store.get(job_id), worker, time.time()))


def _webhook_events(client: Client) -> list[str]:
    """The event types of the webhook deliveries queued, oldest first."""
    messages = client.store.client.lrange(WEBHOOK_QUEUE, 0, -1)
    return [task_args(m)[2] for m in reversed(messages)]


def test_a_superseded_worker_or_attempt_writes_no_progress_and_no_outcome(client: Client):
    store = client.store
    job_id = _queued(client)
    _claim(client, job_id, "w1")
    assert not store.progress(job_id, 1, 4, worker="w1", attempt=1).superseded
    # The reaper thought w1 dead and handed the job back; w2 runs it as attempt 2.
    moved = store.move(job_id, lifecycle.hand_back("gpu16", "worker w1 died", owner="w1"))
    assert moved == Moved(JobStatus.RUNNING, JobStatus.QUEUED)  # no cancel asked: requeued
    assert store.client.llen("gpu16") == 1 and _webhook_events(client) == ["job.queued"]
    _claim(client, job_id, "w2")
    progress_before = len(store.events(job_id))

    stale = store.progress(job_id, 3, 4, worker="w1", attempt=1)
    assert stale.superseded and stale.status is JobStatus.RUNNING
    # The same worker name at an old attempt is stale too (a worker that claimed it again).
    assert store.progress(job_id, 3, 4, worker="w2", attempt=1).superseded
    record = store.get(job_id)
    assert (record.step, record.worker, record.attempt) == (1, "w2", 2)
    assert len(store.events(job_id)) == progress_before

    for worker, attempt in [("w1", 1), ("w1", 2), ("w2", 1)]:
        with pytest.raises(Conflict):
            store.move(
                job_id,
                lifecycle.finish(
                    JobStatus.SUCCEEDED,
                    owner=worker,
                    attempt=attempt,
                    finished_at=time.time(),
                    outputs=[Output(f"jobs/{job_id}/attempt-1/output-0.png", "image/png", 1)],
                ),
            )
    assert store.get(job_id).status is JobStatus.RUNNING and store.get(job_id).outputs == []

    assert not store.progress(job_id, 2, 4, worker="w2", attempt=2).superseded
    moved = store.move(
        job_id, lifecycle.finish(JobStatus.SUCCEEDED, owner="w2", attempt=2, finished_at=time.time())
    )
    assert moved == Moved(JobStatus.RUNNING, JobStatus.SUCCEEDED)
    assert store.get(job_id).step == 2


def test_a_claim_at_a_stale_attempt_takes_nothing(client: Client):
    # Two workers read the queued record (attempt 0); the first claims it. The second's claim,
    # made on what it read, must not take the job from the first.
    job_id = _queued(client)
    read = client.store.get(job_id)
    client.store.move(job_id, lifecycle.claim(read, "w1", time.time()))
    with pytest.raises(Conflict):
        client.store.move(job_id, lifecycle.claim(read, "w2", time.time()))
    assert (client.store.get(job_id).worker, client.store.get(job_id).attempt) == ("w1", 1)


@pytest.mark.parametrize("how", ["hand-back", "escalation", "redelivery"])
def test_a_cancel_asked_while_running_outlives_the_worker(client: Client, how: str):
    store = client.store
    job_id = _queued(client)
    _claim(client, job_id, "w1")
    assert store.cancel(job_id) is JobStatus.RUNNING  # asked; w1 would stop at its next step...
    # ...but w1 never gets there: it dies (the reaper hands the job back, or a second copy of
    # its message claims it) or runs out of memory first.
    if how == "hand-back":
        moved = store.move(job_id, lifecycle.hand_back("gpu16", "worker w1 died", owner="w1"))
    elif how == "escalation":
        error = JobError(type=ErrorType.OUT_OF_MEMORY, message="out of memory")
        moved = store.move(job_id, lifecycle.escalate("gpu80", [], error, owner="w1", attempt=1))
    else:
        moved = store.move(job_id, lifecycle.claim(store.get(job_id), "w2", time.time()))

    assert moved == Moved(JobStatus.RUNNING, JobStatus.CANCELED)
    record = store.get(job_id)
    assert record.status is JobStatus.CANCELED and record.cancel_requested
    assert (record.queue, record.attempt, record.worker) == ("gpu16", 1, "w1")
    assert record.finished_at is not None and record.handed_back is None
    assert [e["type"] for e in store.events(job_id)] == ["job.queued", "job.started", "job.canceled"]
    assert _webhook_events(client) == ["job.canceled"]
    # Nothing queued to run it again, and it no longer counts against its tenant.
    assert store.client.llen("gpu16") == store.client.llen("gpu80") == 0
    assert store.running() == [] and store.client.zcard(store.keys.queued("gpu16")) == 0
    assert not store.client.sismember(store.keys.tenant_in_flight("t"), job_id)
    assert store.client.ttl(store.keys.job(job_id)) > 0

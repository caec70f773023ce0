"""A cancel asked for while a job runs outlives whatever then becomes of its run, through real
worker processes: the runner's own hand-back when its worker is stopped (SIGTERM), its escalation
when the job runs out of memory, and a kill of its pool child (Celery redelivers the message, the
reaper hands the job back). Each time the cancel is asked in the gap the fault adapter holds open
just before that move (``fault:await-cancel``: after the last step that could have seen it), so
only the move itself can honour it. The job ends canceled and never runs again.

tests/integration/test_job_fence.py makes the same moves on the store alone, with arguments it
chooses, and checks what each writes (events, webhook deliveries, indexes)."""

from __future__ import annotations

import json
import signal

import pytest

from producer.client import Client
from routing.celery_config import UNACKED_KEY
from routing.io.storage import LocalStorage
from routing.jobs.messages import task_id
from routing.jobs.record import JobStatus
from tests.faults.harness import event_types, small_request, wait_for, wait_log, wait_warm
from worker.liveness import pid_of

pytestmark = pytest.mark.integration


def _main_pid_of(worker_name: str) -> int:
    with open(f"/proc/{pid_of(worker_name)}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("PPid:"))


def _copies(redis, job_id: str) -> int:
    """Messages of the job anywhere a worker could take one from: queued or unacknowledged."""
    queued = [m for queue in ("gpu16", "gpu80", "h100x8") for m in redis.lrange(queue, 0, -1)]
    held = [json.loads(raw)[0] for raw in redis.hvals(UNACKED_KEY)]
    return sum(task_id(m) == job_id for m in queued + held)


def _ended_canceled_once(client: Client, job_id: str, fleet_settings) -> None:
    record = wait_for(lambda: (r := client.get(job_id)).status.is_terminal() and r, 60, "job ended")
    assert record.status is JobStatus.CANCELED and record.cancel_requested, (record.status, record.error)
    assert record.attempt == 1 and record.outputs == [] and record.escalations == []
    assert record.queue == "gpu16" and record.handed_back is None
    assert event_types(client.store, job_id) == ["job.queued", "job.started", "job.canceled"]
    store = client.store
    assert job_id not in store.running()
    assert not store.client.sismember(store.keys.tenant_in_flight(record.tenant), job_id)
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job_id}/") == []


def test_a_cancel_asked_just_before_a_sigterm_hand_back_ends_the_job_canceled(
    client: Client, start_worker, fleet_settings, fault_redis
):
    """The worker is told to stop (its main process gets SIGTERM, as from Kubernetes); its job's
    next step sees the drain mark and the runner hands the job back; the cancel lands between that
    step and the hand-back. Catches a hand-back that requeues a job whose cancel was asked for
    (the idle second worker would run it again, to success)."""
    workers = [start_worker(), start_worker()]
    for worker in workers:
        wait_warm(worker)
    job = client.submit(
        small_request("canceled as it is handed back fault:sleep=0.2 fault:await-cancel=60", steps=30)
    )
    owner = wait_for(lambda: (r := client.get(job.id)).step >= 1 and r.worker, 60, "job running")
    stopped = next(w for w in workers if w.proc.pid == _main_pid_of(owner))
    other = next(w for w in workers if w is not stopped)

    stopped.signal(signal.SIGTERM)
    wait_log(stopped, f"fault adapter: awaiting the cancel of {job.id}", timeout_s=30)
    # The status the cancel found, in the same step: the client's record is read after it, and
    # by then the worker may have ended the job (as it should).
    assert client.store.cancel(job.id) is JobStatus.RUNNING  # asked; no step will see it

    _ended_canceled_once(client, job.id, fleet_settings)
    # Logged after the move the record already shows: waited for, not read at once.
    wait_log(
        stopped, f"job {job.id} canceled instead of handed back (worker {owner} shut down)", timeout_s=10
    )
    # The stopped worker exits, and no copy of the message is left anywhere to run the job again.
    assert stopped.proc.wait(timeout=30) == 0, stopped.log()[-3000:]
    assert _copies(fault_redis.client(), job.id) == 0
    assert f"run_job[{job.id}] received" not in other.log()


def test_a_cancel_asked_just_before_an_escalation_ends_the_job_canceled(
    client: Client, start_worker, fleet_settings, fault_redis
):
    """The job runs out of memory on gpu16 after the cancel was asked, with no step between.
    Catches an escalation that sends a canceled job to the bigger class's queue."""
    worker = start_worker()
    wait_warm(worker)
    job = client.submit(
        small_request("canceled, then out of memory fault:oom-on=gpu16 fault:await-cancel=60")
    )
    wait_log(worker, f"fault adapter: awaiting the cancel of {job.id}", timeout_s=60)
    assert client.store.cancel(job.id) is JobStatus.RUNNING

    _ended_canceled_once(client, job.id, fleet_settings)
    wait_log(worker, f"job {job.id} ran out of memory after its cancel was asked for; canceled", timeout_s=10)
    # Nothing waits on gpu80 for it; the message it ran from is acknowledged as the task ends.
    wait_for(lambda: _copies(fault_redis.client(), job.id) == 0, 30, "no copy of the message left")


def test_a_cancel_asked_just_before_a_kill_ends_the_job_canceled_on_redelivery(
    client: Client, start_worker, fleet_settings, fault_redis
):
    """The job's pool child is killed (SIGKILL) after the cancel was asked, with no step
    between; Celery puts the message back for the worker's next pool child, whose claim or whose
    reaper's hand-back, whichever comes first, must honour the cancel. Catches a redelivered
    claim or a reaper hand-back that runs the job again."""
    worker = start_worker()
    wait_warm(worker)
    job = client.submit(small_request("canceled, then killed fault:kill-at=2 fault:await-cancel=60", steps=4))
    wait_log(worker, f"fault adapter: awaiting the cancel of {job.id}", timeout_s=60)
    assert client.store.cancel(job.id) is JobStatus.RUNNING

    _ended_canceled_once(client, job.id, fleet_settings)
    # The redelivered message reaches the new pool child, which ends or drops it as canceled.
    wait_for(lambda: f"job {job.id}: '" in worker.log(), 60, "the redelivered message's outcome")
    outcome = worker.log().split(f"job {job.id}: '")[1].split("'")[0]
    assert outcome in ("canceled", "skipped (canceled)"), outcome
    assert worker.log().count(f"run_job[{job.id}] received") == 2
    wait_for(lambda: _copies(fault_redis.client(), job.id) == 0, 30, "no copy of the message left")
    _ended_canceled_once(client, job.id, fleet_settings)  # and still so

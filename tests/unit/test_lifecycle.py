"""Each named move of a job's lifecycle on the suite's Redis: from which states it goes, from
which it is refused (nothing written), and the fence that keeps a stale worker or attempt out."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis as redis_lib

from routing.errors import Conflict, ErrorType, JobError
from routing.jobs import lifecycle
from routing.jobs.keys import Keys
from routing.jobs.lifecycle import DeadLetter, Move, Moved
from routing.jobs.record import TRANSITIONS, JobStatus
from routing.jobs.store import JobStore, NewJob
from tests.messages import ListMessages

ERROR = JobError(type=ErrorType.MODEL_ERROR, message="it broke")
QUEUE = "gpu16"  # the jobs' queue
LIST = "lifecycle-test:gpu16"  # where its messages go here: no worker reads it


@pytest.fixture
def store(redis_client: redis_lib.Redis) -> Iterator[JobStore]:
    messages = ListMessages(LIST)
    store = JobStore(redis_client, Keys(f"test-{uuid.uuid4().hex[:8]}"), ttl_s=3600, messages=messages)
    redis_client.delete(LIST)
    yield store
    redis_client.delete(LIST)


def _queued(store: JobStore) -> str:
    job_id = uuid.uuid4().hex
    store.create([NewJob(job_id, "z-image-turbo", "text-to-image", "{}", QUEUE, (LIST, "first"))])
    store.client.delete(LIST)
    return job_id


def _running(store: JobStore, worker: str = "w1") -> str:
    job_id = _queued(store)
    store.move(job_id, lifecycle.claim(store.get(job_id), worker, time.time()))
    return job_id


def _ended(store: JobStore) -> str:
    job_id = _running(store)
    store.move(job_id, lifecycle.finish(JobStatus.SUCCEEDED, owner="w1", attempt=1, finished_at=time.time()))
    return job_id


def _refused(store: JobStore, job_id: str, move: Move) -> None:
    before = store.client.hgetall(store.keys.job(job_id))
    events = len(store.events(job_id))
    with pytest.raises(Conflict):
        store.move(job_id, move)
    assert store.client.hgetall(store.keys.job(job_id)) == before
    assert len(store.events(job_id)) == events and store.client.llen(LIST) == 0


# name -> (the move, built from the job's id and record, the states it may go from)
MOVES: dict[str, tuple[Callable[[JobStore, str], Move], set[JobStatus]]] = {
    "claim": (
        lambda s, j: lifecycle.claim(s.get(j), "w2", time.time()),
        {JobStatus.QUEUED, JobStatus.RUNNING},
    ),
    "finish": (
        lambda s, j: lifecycle.finish(
            JobStatus.FAILED, owner=None, attempt=None, finished_at=1.0, error=ERROR
        ),
        {JobStatus.RUNNING},
    ),
    "hand_back": (lambda s, j: lifecycle.hand_back(QUEUE, "stopped", owner="w1"), {JobStatus.RUNNING}),
    "escalate": (
        lambda s, j: lifecycle.escalate(QUEUE, [], ERROR, owner="w1", attempt=s.get(j).attempt),
        {JobStatus.RUNNING},
    ),
    "give_up": (
        lambda s, j: lifecycle.give_up(ERROR, 1.0, DeadLetter({"id": j}, 10)),
        {JobStatus.QUEUED, JobStatus.RUNNING},
    ),
    "expire": (lambda s, j: lifecycle.expire(ERROR, 1.0), {JobStatus.QUEUED}),
    "cancel": (lambda s, j: lifecycle.cancel(1.0), {JobStatus.QUEUED}),
    "time_out": (lambda s, j: lifecycle.time_out(ERROR, 1.0), {JobStatus.RUNNING}),
}
MAKE = {JobStatus.QUEUED: _queued, JobStatus.RUNNING: _running, JobStatus.SUCCEEDED: _ended}


@pytest.mark.parametrize("name", MOVES)
@pytest.mark.parametrize("source", list(MAKE))
def test_each_move_goes_only_from_its_sources(store: JobStore, name: str, source: JobStatus):
    build, sources = MOVES[name]
    job_id = MAKE[source](store)
    move = build(store, job_id)
    assert set(move.sources) == sources and all(move.target in TRANSITIONS[s] for s in sources)
    if source not in sources:
        _refused(store, job_id, move)
        return
    moved = store.move(job_id, move)
    assert moved == Moved(source, move.target)
    record = store.get(job_id)
    assert record.status is move.target
    assert store.events(job_id)[-1]["status"] == move.target.value
    if move.target is JobStatus.QUEUED:  # back in line with the message that runs it
        [message] = store.client.lrange(LIST, 0, -1)
        assert json.loads(message)["headers"]["id"] == job_id
        assert store.running() == []


def test_a_move_outside_the_transition_table_cannot_be_built():
    with pytest.raises(ValueError):
        Move("finish from queued", JobStatus.SUCCEEDED, (JobStatus.QUEUED,))
    with pytest.raises(ValueError):
        lifecycle.finish(JobStatus.RUNNING, owner=None, attempt=None, finished_at=1.0)


def test_moves_of_a_running_job_are_fenced_by_worker_and_attempt(store: JobStore):
    job_id = _running(store, "w1")  # attempt 1
    stale = [
        lifecycle.finish(JobStatus.SUCCEEDED, owner="w2", attempt=1, finished_at=1.0),
        lifecycle.finish(JobStatus.SUCCEEDED, owner="w1", attempt=2, finished_at=1.0),
        lifecycle.hand_back(QUEUE, "stopped", owner="w2"),
        lifecycle.hand_back(QUEUE, "stopped", owner="w1", attempt=0),
        lifecycle.escalate(QUEUE, [], ERROR, owner="w2", attempt=1),
        lifecycle.escalate(QUEUE, [], ERROR, owner="w1", attempt=0),
    ]
    for move in stale:
        with pytest.raises(Conflict, match="no longer"):
            store.move(job_id, move)
    assert store.get(job_id).status is JobStatus.RUNNING and store.client.llen(LIST) == 0

    # A claim made on a record read before another claim took the job takes nothing.
    read = store.get(job_id)
    store.move(job_id, lifecycle.claim(read, "w2", time.time()))  # redelivered: w1 died
    with pytest.raises(Conflict):
        store.move(job_id, lifecycle.claim(read, "w3", time.time()))
    record = store.get(job_id)
    assert (record.worker, record.attempt) == ("w2", 2)
    moved = store.move(job_id, lifecycle.finish(JobStatus.SUCCEEDED, owner="w2", attempt=2, finished_at=1.0))
    assert moved == Moved(JobStatus.RUNNING, JobStatus.SUCCEEDED)


@pytest.mark.parametrize("name", ["hand_back", "escalate", "claim", "give_up"])
def test_a_cancel_asked_while_running_wins_over_going_back_or_giving_up(store: JobStore, name: str):
    job_id = _running(store, "w1")
    assert store.cancel(job_id) is JobStatus.RUNNING
    moved = store.move(job_id, MOVES[name][0](store, job_id))
    assert moved == Moved(JobStatus.RUNNING, JobStatus.CANCELED)
    assert store.client.llen(LIST) == 0 and store.client.llen(store.keys.dead_letters) == 0


def test_giving_up_dead_letters_the_job_with_its_record(store: JobStore):
    job_id = _running(store)
    store.move(job_id, lifecycle.give_up(ERROR, 1.0, DeadLetter({"id": job_id}, 10)))
    assert [json.loads(e) for e in store.client.lrange(store.keys.dead_letters, 0, -1)] == [{"id": job_id}]
    assert store.get(job_id).error == ERROR


def test_finishing_a_success_clears_an_earlier_escalations_error(store: JobStore):
    job_id = _running(store)
    store.move(job_id, lifecycle.escalate(QUEUE, [{"to": QUEUE}], ERROR, owner="w1", attempt=1))
    store.move(job_id, lifecycle.claim(store.get(job_id), "w2", time.time()))
    assert store.get(job_id).error == ERROR
    store.move(job_id, lifecycle.finish(JobStatus.SUCCEEDED, owner="w2", attempt=2, finished_at=1.0))
    assert store.get(job_id).error is None and store.get(job_id).escalations == [{"to": QUEUE}]

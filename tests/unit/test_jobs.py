"""The job state machine and its atomic Redis writes (fakeredis runs the same Lua)."""

from __future__ import annotations

import inspect
import json
import re
import time

import fakeredis
import pytest

from routing.celery_config import make_celery
from routing.errors import Conflict, ErrorType, JobError, NotFound
from routing.jobs import lifecycle, scripts
from routing.jobs.keys import Keys
from routing.jobs.lifecycle import Moved
from routing.jobs.messages import TaskMessages
from routing.jobs.record import TRANSITIONS, JobStatus, allowed_sources
from routing.jobs.store import Created, JobStore, NewJob, Step
from routing.settings import Settings


@pytest.fixture
def store() -> JobStore:
    messages = TaskMessages(make_celery(Settings(redis_url="redis://127.0.0.1:1/0")))
    return JobStore(fakeredis.FakeRedis(), Keys("unit"), ttl_s=3600, messages=messages)


def _new(job_id: str, **kwargs) -> NewJob:
    return NewJob(
        id=job_id,
        model="z-image-turbo",
        kind="text-to-image",
        request_json="{}",
        queue="gpu16",
        message=("gpu16", f"message-{job_id}"),
        **kwargs,
    )


def _create(store: JobStore, job_id: str = "a" * 32, **kwargs) -> str:
    [(created, found)] = store.create([_new(job_id, **kwargs)])
    assert created is Created.CREATED
    return found


def _claim(store: JobStore, job_id: str, worker: str = "", started_at: float = 1.0) -> Moved:
    return store.move(job_id, lifecycle.claim(store.get(job_id), worker, started_at))


def _finish(store: JobStore, job_id: str, status: JobStatus, **fields) -> Moved:
    return store.move(
        job_id, lifecycle.finish(status, owner=None, attempt=None, finished_at=time.time(), **fields)
    )


def test_terminal_states_have_no_way_out():
    for status in JobStatus:
        assert status.is_terminal() == (not TRANSITIONS[status])
    assert allowed_sources(JobStatus.SUCCEEDED) == [JobStatus.RUNNING]


def test_lifecycle_writes_record_and_events_together(store: JobStore):
    job_id = _create(store)
    assert store.get(job_id).status is JobStatus.QUEUED
    assert store.client.lrange("gpu16", 0, -1) == [f"message-{job_id}".encode()]

    moved = _claim(store, job_id)
    assert moved == Moved(JobStatus.QUEUED, JobStatus.RUNNING)
    assert store.progress(job_id, 1, 4) == Step(JobStatus.RUNNING, cancel=False, drain=False)
    _finish(store, job_id, JobStatus.SUCCEEDED, timings={"run_s": 1.5})

    record = store.get(job_id)
    assert record.status is JobStatus.SUCCEEDED
    assert record.attempt == 1 and record.step == 1 and record.total_steps == 4
    assert record.timings == {"run_s": 1.5}
    assert [e["type"] for e in store.events(job_id)] == [
        "job.queued",
        "job.started",
        "job.progress",
        "job.succeeded",
    ]
    # A finished record expires; a live one does not.
    assert 0 < store.client.ttl(store.keys.job(job_id)) <= 3600


@pytest.mark.parametrize("terminal", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED])
def test_nothing_leaves_a_terminal_state(store: JobStore, terminal: JobStatus):
    job_id = _create(store)
    _claim(store, job_id)
    record = store.get(job_id)
    _finish(store, job_id, terminal)
    error = JobError(type=ErrorType.MODEL_ERROR, message="?")
    every_move = [
        lifecycle.claim(record, "w", 2.0),
        lifecycle.finish(JobStatus.SUCCEEDED, owner=None, attempt=None, finished_at=2.0),
        lifecycle.finish(JobStatus.FAILED, owner=None, attempt=None, finished_at=2.0),
        lifecycle.finish(JobStatus.CANCELED, owner=None, attempt=None, finished_at=2.0),
        lifecycle.hand_back("gpu16", "stopped", owner=""),
        lifecycle.escalate("gpu80", [], error, owner="", attempt=1),
        lifecycle.give_up(error, 2.0, lifecycle.DeadLetter({}, 10)),
        lifecycle.expire(error, 2.0),
        lifecycle.cancel(2.0),
        lifecycle.time_out(error, 2.0),
    ]
    for move in every_move:
        with pytest.raises(Conflict, match=f"is {terminal.value}"):
            store.move(job_id, move)
    assert store.get(job_id).status is terminal


def test_a_queued_job_cannot_succeed_without_running(store: JobStore):
    job_id = _create(store)
    with pytest.raises(Conflict):
        _finish(store, job_id, JobStatus.SUCCEEDED)


def test_redelivery_counts_attempts(store: JobStore):
    job_id = _create(store)
    _claim(store, job_id)
    _claim(store, job_id)  # redelivered: its worker (none named here) died
    assert store.get(job_id).attempt == 2


def test_a_dead_workers_job_claimed_from_running_says_what_a_hand_back_says(store: JobStore):
    """A redelivered message can reach a dead worker's job before the reaper hands it back: the
    claim then records the hand-back and its job.queued event (and that event's webhook) itself,
    so the record and the events read the same whichever of the two got there first."""
    from routing.classes import WEBHOOK_QUEUE
    from routing.jobs.events import Webhook

    job_id = _create(store, webhook=Webhook("https://example.com/hook", ("queued", "started")))
    _claim(store, job_id, "w1")
    webhooks = store.client.llen(WEBHOOK_QUEUE)

    _claim(store, job_id, "w2")  # w1's heartbeat is gone: the runner claims from running

    record = store.get(job_id)
    assert (record.status, record.worker, record.attempt) == (JobStatus.RUNNING, "w2", 2)
    assert record.handed_back == "worker w1 died"
    assert [e["type"] for e in store.events(job_id)] == [
        "job.queued",
        "job.started",
        "job.queued",
        "job.started",
    ]
    assert store.client.llen(WEBHOOK_QUEUE) == webhooks + 2  # queued, then started
    # The reaper's way gives the same: hand back, then a claim from queued.
    other = _create(store, "b" * 32)
    _claim(store, other, "w1")
    store.move(other, lifecycle.hand_back("gpu16", "worker w1 died", owner="w1"))
    _claim(store, other, "w2")
    assert store.get(other).handed_back == record.handed_back
    assert [e["type"] for e in store.events(other)] == [e["type"] for e in store.events(job_id)]


def test_cancel_queued_is_immediate_cancel_running_is_a_request(store: JobStore):
    queued = _create(store, "1" * 32)
    assert store.cancel(queued) is JobStatus.CANCELED

    running = _create(store, "2" * 32)
    _claim(store, running)
    assert store.cancel(running) is JobStatus.RUNNING
    assert store.get(running).cancel_requested
    assert store.progress(running, 2, 4).cancel

    _finish(store, running, JobStatus.SUCCEEDED)
    assert store.cancel(running) is JobStatus.SUCCEEDED


def test_progress_of_a_job_no_longer_running_says_stop(store: JobStore):
    job_id = _create(store)
    store.move(job_id, lifecycle.cancel(time.time()))
    assert store.progress(job_id, 1, 4) == Step(JobStatus.CANCELED, cancel=True, drain=False)
    assert store.get(job_id).step == 0


def test_idempotency_key_returns_the_first_job(store: JobStore):
    first = _create(store, "1" * 32, idempotency_key="k1", request_hash="h")
    [(created, found)] = store.create([_new("2" * 32, idempotency_key="k1")])
    assert (created, found) == (Created.EXISTS, first)
    with pytest.raises(NotFound):
        store.get("2" * 32)
    assert store.client.lrange("gpu16", 0, -1) == [f"message-{first}".encode()]


def test_unknown_job(store: JobStore):
    with pytest.raises(NotFound):
        store.get("f" * 32)
    with pytest.raises(NotFound):
        store.move("f" * 32, lifecycle.cancel(time.time()))
    with pytest.raises(NotFound):
        store.cancel("f" * 32)


def test_many_jobs_in_one_call_each_with_its_message(store: JobStore):
    ids = [f"{i:032x}" for i in range(1, 6)]
    results = store.create([_new(job_id) for job_id in ids])
    assert results == [(Created.CREATED, job_id) for job_id in ids]
    assert store.client.lrange("gpu16", 0, -1)[::-1] == [f"message-{job_id}".encode() for job_id in ids]


def test_a_batch_after_redis_lost_its_scripts_writes_each_job_once(store: JobStore):
    store.client.script_flush()  # what a Redis restart does
    ids = [f"{i:032x}" for i in range(10, 13)]
    assert store.create([_new(job_id) for job_id in ids]) == [(Created.CREATED, job_id) for job_id in ids]
    assert store.client.llen("gpu16") == 3
    assert len(store.events()) == 3


def test_a_tenant_at_its_limit_gets_nothing_queued_until_a_job_finishes(store: JobStore):
    first = _create(store, "1" * 32, tenant="t", max_in_flight=1)
    assert store.create([_new("2" * 32, tenant="t", max_in_flight=1)]) == [(Created.LIMITED, "")]
    assert store.client.llen("gpu16") == 1
    with pytest.raises(NotFound):
        store.get("2" * 32)

    _claim(store, first)
    _finish(store, first, JobStatus.SUCCEEDED)
    assert store.create([_new("2" * 32, tenant="t", max_in_flight=1)]) == [(Created.CREATED, "2" * 32)]


def test_queue_line_follows_the_state(store: JobStore):
    ids = [f"{i:032x}" for i in range(1, 4)]
    for job_id in ids:
        _create(store, job_id)
    line = store.keys.queued("gpu16")
    assert store.client.zrange(line, 0, -1) == [i.encode() for i in ids]
    _claim(store, ids[0], "w1")
    store.cancel(ids[1])
    assert store.client.zrange(line, 0, -1) == [ids[2].encode()]
    store.move(ids[0], lifecycle.hand_back("gpu16", "stopped", owner="w1"))  # to the end of the line
    assert store.client.zrange(line, 0, -1) == [ids[2].encode(), ids[0].encode()]


def test_a_draining_worker_is_told_at_the_next_step(store: JobStore):
    job_id = _create(store)
    _claim(store, job_id, "w1")
    assert not store.progress(job_id, 1, 4, drain_key="drain:w1").drain
    store.client.set("drain:w1", "1")
    assert store.progress(job_id, 2, 4, drain_key="drain:w1") == Step(
        JobStatus.RUNNING, cancel=False, drain=True
    )


def test_hand_back_pushes_the_message_with_the_state_change_and_only_for_its_owner(store: JobStore):
    job_id = _create(store)
    store.client.delete("gpu16")
    _claim(store, job_id, "w1")
    assert store.running() == [job_id]
    with pytest.raises(Conflict, match="no longer has it"):
        store.move(job_id, lifecycle.hand_back("gpu16", "stopped", owner="w2"))
    assert store.client.llen("gpu16") == 0

    store.move(job_id, lifecycle.hand_back("gpu16", "stopped", owner="w1"))
    [message] = store.client.lrange("gpu16", 0, -1)
    assert json.loads(message)["headers"]["id"] == job_id  # the message that runs it again
    assert store.running() == []
    assert store.client.zrange(store.keys.queued("gpu16"), 0, -1) == [job_id.encode()]


def test_the_scripts_spell_no_key_name_and_read_arguments_by_name():
    # Every fixed piece of every key Keys builds, e.g. ":queued:", ":running", ":tenant:".
    keys = Keys("PREFIX")
    built = [getattr(keys, name) for name in dir(Keys) if not name.startswith("_") and name != "template"]
    names = [
        key(*["VALUE"] * len(inspect.signature(key).parameters)) if callable(key) else key for key in built
    ]
    pieces = {piece for name in names for piece in re.split("PREFIX|VALUE", name) if piece.strip(":")}
    assert ":queued:" in pieces and ":running" in pieces and ":tenant:" in pieces
    for name in ("TRANSITION", "CREATE", "PROGRESS", "REQUEST_CANCEL"):
        lua = getattr(scripts, name)
        assert [p for p in pieces if p in lua] == [], name
        assert "KEYS[" not in lua and "prefix" not in lua, name
        assert lua.count("ARGV") == 1 and "ARGV[1]" in lua, name


def test_a_key_template_is_the_key_cut_around_its_value():
    keys = Keys("p{}x")  # a prefix holding the hole's own text
    head, tail = keys.template(keys.tenant_in_flight)
    assert head + "acme" + tail == keys.tenant_in_flight("acme")


def test_text_beyond_ascii_reaches_the_record_unchanged(store: JobStore):
    job_id = _create(store, tenant="équipe-東京", idempotency_key="clé 🦊")
    _claim(store, job_id, "wörker")
    record = store.get(job_id)
    assert (record.tenant, record.idempotency_key, record.worker) == ("équipe-東京", "clé 🦊", "wörker")
    assert store.client.sismember(store.keys.tenant_in_flight("équipe-東京"), job_id)
    _finish(store, job_id, JobStatus.SUCCEEDED)
    assert not store.client.sismember(store.keys.tenant_in_flight("équipe-東京"), job_id)


@pytest.mark.parametrize("error_type", list(ErrorType))
def test_every_error_type_is_stored_as_the_same_json_and_read_back(store: JobStore, error_type: ErrorType):
    job_id = _create(store)
    _claim(store, job_id)
    error = JobError(
        type=error_type, exception="RuntimeError", message="it broke", where="RuntimeError: it broke"
    )
    _finish(store, job_id, JobStatus.FAILED, error=error)
    raw = store.client.hget(store.keys.job(job_id), "error")
    assert json.loads(raw) == {
        "type": error_type.value,
        "exception": "RuntimeError",
        "message": "it broke",
        "where": "RuntimeError: it broke",
    }
    assert store.get(job_id).error == error


def test_an_error_type_the_fleet_does_not_record_is_refused():
    with pytest.raises(ValueError, match="not_a_type"):
        JobError.from_dict({"type": "not_a_type", "message": "?"})


def test_the_runner_records_error_types_that_parse_back(store: JobStore):
    from types import SimpleNamespace

    from routing.classes import VramClass
    from worker.runner import Ended, JobRunner

    # No model runs here; the pool only names the class the busy totals are counted under.
    pool = SimpleNamespace(vram_class=VramClass.GPU16)

    def runner(**kwargs) -> JobRunner:
        return JobRunner(store, storage=None, pool=pool, worker_name="w", **kwargs)  # type: ignore[arg-type]

    # Gave up: the job already used every attempt.
    job_id = _create(store, "1" * 32)
    assert runner(max_attempts=0).run(job_id) == Ended(JobStatus.FAILED, store.get(job_id).error)
    assert store.get(job_id).error.type is ErrorType.TOO_MANY_ATTEMPTS
    # Waited in the queue longer than the fleet allows.
    job_id = _create(store, "2" * 32)
    assert runner(max_wait_s=-1).run(job_id) == Ended(JobStatus.FAILED, store.get(job_id).error)
    assert store.get(job_id).error.type is ErrorType.EXPIRED
    # The stored request no longer passes the checks ("{}" names no model).
    job_id = _create(store, "3" * 32)
    assert runner().run(job_id) == Ended(JobStatus.FAILED, store.get(job_id).error)
    error = store.get(job_id).error
    assert (error.type, error.exception) == (ErrorType.INVALID_REQUEST, "InvalidRequest")


def test_giving_up_on_a_job_whose_cancel_was_asked_ends_it_canceled_and_dead_letters_nothing(
    store: JobStore,
):
    from types import SimpleNamespace

    from routing.classes import VramClass
    from worker.runner import Ended, JobRunner

    pool = SimpleNamespace(vram_class=VramClass.GPU16)
    runner = JobRunner(store, storage=None, pool=pool, worker_name="w", max_attempts=1)  # type: ignore[arg-type]

    # Its worker (no heartbeat: dead) was asked to cancel it, then died before the next step;
    # the message comes back with every attempt used.
    canceled = _create(store, "1" * 32)
    _claim(store, canceled, "gone")
    assert store.cancel(canceled) is JobStatus.RUNNING
    assert runner.run(canceled) == Ended(JobStatus.CANCELED)
    record = store.get(canceled)
    assert (record.status, record.error, record.cancel_requested) == (JobStatus.CANCELED, None, True)
    assert store.client.llen(store.keys.dead_letters) == 0

    # Without a cancel the same job fails, and its dead letter is written with the record.
    failed = _create(store, "2" * 32)
    _claim(store, failed, "gone")
    assert runner.run(failed) == Ended(JobStatus.FAILED, store.get(failed).error)
    assert store.get(failed).error.type is ErrorType.TOO_MANY_ATTEMPTS
    [letter] = [json.loads(raw) for raw in store.client.lrange(store.keys.dead_letters, 0, -1)]
    assert (letter["id"], letter["attempts"]) == (failed, 1)

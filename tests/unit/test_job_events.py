"""One job's own event stream: written in the same Lua step as the fleet's stream, bounded, and
expiring with the record (fakeredis runs the same Lua); a stage of the work before the steps in
its events, the check between them that writes nothing, and how the stage's reports are thinned
out to events."""

from __future__ import annotations

import time

import fakeredis

from routing.jobs import lifecycle, scripts
from routing.jobs.keys import Keys
from routing.jobs.record import JobStatus
from routing.jobs.store import JobStore, NewJob, Step
from worker.stages import Throttle


def _store() -> JobStore:
    return JobStore(fakeredis.FakeRedis(), Keys("unit"), ttl_s=3600)


def _create(store: JobStore, job_id: str) -> None:
    store.create(
        [NewJob(job_id, "z-image-turbo", "text-to-image", "{}", "gpu16", ("gpu16", f"message-{job_id}"))]
    )


def _types(store: JobStore, job_id: str) -> list[str]:
    entries = store.client.xrange(store.keys.job_events(job_id))
    return [fields[b"type"].decode() for _, fields in entries]


def test_each_job_stream_holds_only_its_own_events_in_order():
    store = _store()
    _create(store, "a")
    _create(store, "b")
    store.move("a", lifecycle.claim(store.get("a"), "", time.time()))
    store.progress("a", 1, 2)
    store.move("b", lifecycle.cancel(time.time()))
    store.progress("a", 2, 2)
    store.move("a", lifecycle.finish(JobStatus.SUCCEEDED, owner=None, attempt=None, finished_at=time.time()))

    assert _types(store, "a") == [
        "job.queued",
        "job.started",
        "job.progress",
        "job.progress",
        "job.succeeded",
    ]
    assert _types(store, "b") == ["job.queued", "job.canceled"]
    _, last_progress = store.client.xrange(store.keys.job_events("a"))[3]
    assert (last_progress[b"step"], last_progress[b"total"]) == (b"2", b"2")


def test_the_job_stream_expires_with_the_record():
    store = _store()
    _create(store, "a")
    assert store.client.ttl(store.keys.job_events("a")) == -1  # unfinished: kept like the record
    store.move("a", lifecycle.cancel(time.time()))
    record_ttl = store.client.ttl(store.keys.job("a"))
    assert 0 < record_ttl <= 3600
    assert abs(store.client.ttl(store.keys.job_events("a")) - record_ttl) <= 1


def test_the_job_stream_is_bounded():
    store = _store()
    _create(store, "a")
    store.move("a", lifecycle.claim(store.get("a"), "", time.time()))
    for step in range(scripts.JOB_EVENTS_MAXLEN + 200):
        store.progress("a", step, 10_000)
    length = store.client.xlen(store.keys.job_events("a"))
    # MAXLEN ~ trims in whole nodes: near the bound, never far past it.
    assert scripts.JOB_EVENTS_MAXLEN <= length < scripts.JOB_EVENTS_MAXLEN + 200


def test_a_stage_of_the_work_before_the_steps_is_named_in_its_events_and_the_record():
    store = _store()
    _create(store, "a")
    store.move("a", lifecycle.claim(store.get("a"), "w", time.time()))
    store.progress("a", 3, 9, stage="preprocess.pose", worker="w", attempt=1)
    assert (store.get("a").step, store.get("a").stage) == (3, "preprocess.pose")
    store.progress("a", 1, 2, worker="w", attempt=1)  # the denoising steps name none
    assert (store.get("a").step, store.get("a").total_steps, store.get("a").stage) == (1, 2, None)

    progress = [
        f for _, f in store.client.xrange(store.keys.job_events("a")) if f[b"type"] == b"job.progress"
    ]
    assert [(f[b"step"], f.get(b"stage")) for f in progress] == [(b"3", b"preprocess.pose"), (b"1", None)]
    fleet = [f for _, f in store.client.xrange(store.keys.events) if f[b"type"] == b"job.progress"]
    assert [f.get(b"stage") for f in fleet] == [b"preprocess.pose", None]


def test_a_check_says_what_a_step_would_and_writes_nothing():
    store = _store()
    _create(store, "a")
    store.move("a", lifecycle.claim(store.get("a"), "w", time.time()))

    def written() -> tuple[int, dict]:
        return store.client.xlen(store.keys.job_events("a")), store.client.hgetall(store.keys.job("a"))

    before = written()
    assert store.check("a", worker="w", attempt=1) == Step(JobStatus.RUNNING, False, False)
    store.client.set("drain-flag", "1")
    assert store.check("a", "drain-flag", worker="w", attempt=1).drain
    assert store.check("a", worker="other", attempt=1).superseded
    assert written() == before
    store.cancel("a")
    assert store.check("a", worker="w", attempt=1).cancel


def test_a_stages_reports_become_events_first_and_then_once_an_interval():
    now = [0.0]
    throttle = Throttle(0.5, clock=lambda: now[0])
    due = []
    for stage, at in [("detect", 0.0), ("detect", 0.2), ("detect", 0.5), ("detect", 0.6), ("pose", 0.7)]:
        now[0] = at
        due.append(throttle.due(stage))
    assert due == [True, False, True, False, True]
    assert all(Throttle(0.0, clock=lambda: 1.0).due("pose") for _ in range(3))

"""One job's own event stream: written in the same Lua step as the fleet's stream, bounded, and
expiring with the record (fakeredis runs the same Lua)."""

from __future__ import annotations

import time

import fakeredis

from routing.jobs import lifecycle, scripts
from routing.jobs.keys import Keys
from routing.jobs.record import JobStatus
from routing.jobs.store import JobStore, NewJob


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

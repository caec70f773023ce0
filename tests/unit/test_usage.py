"""A tenant's usage (``routing.jobs.usage``) on the suite's Redis: written by the same Lua step that
ends a job, so each end counts once, on the UTC day it happened, by the class the job ended on,
with the GPU time of the attempt that ended it; read back by day, and as Prometheus counters."""

from __future__ import annotations

import datetime as dt
import time
import types
import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib

from producer.metrics import FleetCollector
from routing.errors import Conflict, ErrorType, InvalidRequest, JobError
from routing.jobs import lifecycle
from routing.jobs import store as store_module
from routing.jobs.keys import Keys
from routing.jobs.lifecycle import DeadLetter
from routing.jobs.record import JobStatus, Output
from routing.jobs.store import JobStore, NewJob
from routing.jobs.usage import (
    DAY_S,
    Usage,
    UsageRow,
    UsageTotals,
    day_number,
    month_gpu_s,
    month_of,
    month_start,
    next_month_at,
    query_range,
    read_usage,
    tenants_with_usage,
)
from tests.messages import ListMessages

LIST = "usage-test:messages"  # where requeued jobs' messages go: no worker reads it
ERROR = JobError(type=ErrorType.MODEL_ERROR, message="it broke")
VIDEO = Output("jobs/x/output-0.mp4", "video/mp4", 40_000, 64, 64, 1, frames=121, fps=24)
IMAGE = Output("jobs/x/output-1.png", "image/png", 1_500, 64, 64, 2)


@pytest.fixture
def store(redis_client: redis_lib.Redis) -> Iterator[JobStore]:
    messages = ListMessages(LIST)
    keys = Keys(f"test-{uuid.uuid4().hex[:8]}")
    yield JobStore(redis_client, keys, ttl_s=3600, messages=messages, usage_retention_days=3)
    redis_client.delete(LIST, *redis_client.keys(f"{keys.prefix}:*"))


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _queued(store: JobStore, tenant: str = "acme", model: str = "z-image-turbo", queue: str = "gpu16") -> str:
    job_id = uuid.uuid4().hex
    store.create([NewJob(job_id, model, "text-to-image", "{}", queue, (LIST, "m"), tenant=tenant)])
    return job_id


def _claim(store: JobStore, job_id: str, worker: str = "w1") -> None:
    store.move(job_id, lifecycle.claim(store.get(job_id), worker, time.time()))


def _finish(store: JobStore, job_id: str, status: JobStatus, held_s: float | None, **fields) -> None:
    record = store.get(job_id)
    timings = {"run_s": 9.0} | ({} if held_s is None else {"held_s": held_s})
    move = lifecycle.finish(
        status,
        owner=record.worker,
        attempt=record.attempt,
        finished_at=time.time(),
        timings=timings,
        **fields,
    )
    store.move(job_id, move)


def _usage(store: JobStore, tenant: str = "acme", start: dt.date | None = None) -> Usage:
    return read_usage(store.client, store.keys, tenant, start or _today(), _today())


def test_a_succeeded_job_counts_once_with_its_gpu_seconds_and_outputs(store: JobStore) -> None:
    job_id = _queued(store, model="wan2.2-ti2v-5b", queue="h100x8")
    _claim(store, job_id)
    _finish(store, job_id, JobStatus.SUCCEEDED, 2.5, outputs=[VIDEO, IMAGE])
    with pytest.raises(Conflict):  # a second end (a stale worker's) is refused, and counts nothing
        _finish(store, job_id, JobStatus.FAILED, 7.0, error=ERROR)

    usage = _usage(store)

    # An h100x8 worker holds eight GPUs: 2.5 s held is 20 GPU-seconds.
    row = UsageRow(_today(), "wan2.2-ti2v-5b", "h100x8", "succeeded", 1, 20.0, 2.5, 2, 41_500, 5.0417)
    assert usage.rows == [row]
    assert usage.totals == UsageTotals(jobs=1, gpu_s=20.0, outputs=2, output_bytes=41_500, video_s=5.0417)
    assert Usage.from_json(usage.to_json()) == usage
    samples = {
        (s.name, s.labels["tenant"], s.labels["class"], s.labels["status"]): s.value
        for family in FleetCollector(store.client, store.keys).collect()
        if family.name.startswith("fleet_tenant_")
        for s in family.samples
    }
    assert samples == {
        ("fleet_tenant_jobs_finished_total", "acme", "h100x8", "succeeded"): 1.0,
        ("fleet_tenant_gpu_seconds_total", "acme", "h100x8", "succeeded"): 20.0,
    }
    # A tenant's GPU budget for the month, and what its month used, for each tenant that has one.
    budgets = FleetCollector(store.client, store.keys, per_tenant=False, budgets={"acme": 50.0, "quiet": 5.0})
    assert {
        (s.name, s.labels["tenant"]): s.value
        for family in budgets.collect()
        if family.name.startswith("fleet_tenant_")
        for s in family.samples
    } == {
        ("fleet_tenant_gpu_budget_seconds", "acme"): 50.0,
        ("fleet_tenant_gpu_budget_seconds", "quiet"): 5.0,
        ("fleet_tenant_month_gpu_seconds", "acme"): 20.0,
        ("fleet_tenant_month_gpu_seconds", "quiet"): 0.0,
    }
    # FLEET_METRICS_PER_TENANT=false: none of them, the fleet's own series still there.
    names = {family.name for family in FleetCollector(store.client, store.keys, per_tenant=False).collect()}
    assert "fleet_jobs_running" in names and not any(n.startswith("fleet_tenant_") for n in names)


def test_every_end_counts_and_only_the_attempt_that_ended_the_job_is_held(store: JobStore) -> None:
    canceled = _queued(store)
    store.move(canceled, lifecycle.cancel(time.time()))
    expired = _queued(store)
    store.move(expired, lifecycle.expire(ERROR, time.time()))
    # Its first worker died mid-job: the second attempt's 1.25 s is what counts.
    redelivered = _queued(store)
    _claim(store, redelivered, "w1")
    _claim(store, redelivered, "w2")
    _finish(store, redelivered, JobStatus.SUCCEEDED, 1.25, outputs=[IMAGE])
    failed = _queued(store)
    _claim(store, failed)
    _finish(store, failed, JobStatus.FAILED, 0.5, error=ERROR)
    # Stopped at a step after its cancel: the worker measured what it held until then.
    stopped = _queued(store)
    _claim(store, stopped)
    store.cancel(stopped)
    _finish(store, stopped, JobStatus.CANCELED, 0.75)
    # Its worker shut down after the cancel was asked: the hand-back ends it canceled, no time said.
    handed = _queued(store)
    _claim(store, handed)
    store.cancel(handed)
    store.move(handed, lifecycle.hand_back("gpu16", "worker w1 shut down", owner="w1"))
    # Every attempt's worker died: given up, nothing held.
    given_up = _queued(store)
    _claim(store, given_up)
    store.move(given_up, lifecycle.give_up(ERROR, time.time(), DeadLetter({"id": given_up}, 10)))

    rows = {row.status: row for row in _usage(store).rows}

    assert set(rows) == {"canceled", "failed", "succeeded"}
    assert (rows["canceled"].jobs, rows["canceled"].held_s, rows["canceled"].outputs) == (3, 0.75, 0)
    assert (rows["failed"].jobs, rows["failed"].held_s, rows["failed"].outputs) == (3, 0.5, 0)
    assert (rows["succeeded"].jobs, rows["succeeded"].held_s, rows["succeeded"].outputs) == (1, 1.25, 1)
    assert all(row.gpu_s == row.held_s for row in rows.values())  # gpu16: one GPU


def test_an_escalated_job_counts_on_the_class_it_ended_on(store: JobStore) -> None:
    job_id = _queued(store)
    _claim(store, job_id)
    store.move(job_id, lifecycle.escalate("gpu80", [], ERROR, owner="w1", attempt=1))
    _claim(store, job_id, "big")
    _finish(store, job_id, JobStatus.SUCCEEDED, 3.0, outputs=[IMAGE])

    [row] = _usage(store).rows

    assert (row.vram_class, row.jobs, row.held_s) == ("gpu80", 1, 3.0)


def test_each_tenant_reads_its_own_and_a_job_with_no_tenant_counts_under_its_folder(store: JobStore) -> None:
    for tenant in ("acme", "acme", "bolt", ""):
        job_id = _queued(store, tenant=tenant)
        _claim(store, job_id)
        _finish(store, job_id, JobStatus.SUCCEEDED, 1.0, outputs=[IMAGE])

    assert _usage(store, "acme").totals.jobs == 2
    assert _usage(store, "bolt").totals.jobs == 1
    assert _usage(store, "_").totals.jobs == 1
    assert _usage(store, "nobody") == Usage("nobody", _today(), _today(), [], UsageTotals())
    assert tenants_with_usage(store.client, store.keys, _today(), _today()) == ["_", "acme", "bolt"]


def test_a_job_counts_on_the_utc_day_it_ended_and_the_day_expires_after_the_retention(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    day = _today() - dt.timedelta(days=1)
    midnight = (day_number(day) + 1) * DAY_S
    ends = iter([midnight - 0.001, midnight])  # 23:59:59.999 of yesterday, 00:00 of today
    for at in ends:
        job_id = _queued(store)
        _claim(store, job_id)
        monkeypatch.setattr(store_module, "time", types.SimpleNamespace(time=lambda at=at: at))
        _finish(store, job_id, JobStatus.SUCCEEDED, 1.0, outputs=[IMAGE])
        monkeypatch.undo()

    usage = _usage(store, start=day)

    assert [(row.date, row.jobs) for row in usage.rows] == [(day, 1), (_today(), 1)]
    # The store keeps each day three days after it ends (usage_retention_days=3).
    for kept in (day, _today()):
        expires = store.client.expiretime(store.keys.usage(day_number(kept), "acme"))
        assert expires == (day_number(kept) + 1 + 3) * DAY_S
    assert store.client.expiretime(store.keys.usage_tenants(day_number(day))) == (day_number(day) + 4) * DAY_S


def test_a_budget_reads_the_month_counted_from_its_days_once_then_added_to_by_each_end(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def ended(held_s: float, queue: str, at: float | None = None) -> None:
        job_id = _queued(store, queue=queue)
        _claim(store, job_id)
        if at is not None:
            monkeypatch.setattr(store_module, "time", types.SimpleNamespace(time=lambda: at))
        _finish(store, job_id, JobStatus.SUCCEEDED, held_s, outputs=[IMAGE])
        monkeypatch.undo()

    today = _today()
    month = store.keys.usage_month(month_of(day_number(today)), "acme")
    # Ended before the month's total was first read (a tenant's first submit of the month, or a
    # fleet just upgraded): counted from the day's hash on the first read.
    ended(2.5, "h100x8")
    assert not store.client.exists(month)
    assert month_gpu_s(store.client, store.keys, "acme") == 20.0  # 2.5 s on eight GPUs
    next_month = next_month_at(today)
    assert store.client.expiretime(month) == next_month + DAY_S  # a day past the month
    # From then on, each end adds to it in the step that ends the job, as to the day's hash.
    ended(0.75, "gpu16")
    ended(1.5, "gpu80")
    by_days = read_usage(store.client, store.keys, "acme", month_start(today), today).totals.gpu_s
    assert month_gpu_s(store.client, store.keys, "acme") == by_days == 22.25
    # The days are not read again: the month's hash alone is the budget's figure.
    store.client.delete(store.keys.usage(day_number(today), "acme"))
    assert month_gpu_s(store.client, store.keys, "acme") == 22.25
    # A job that ends as the next month starts is the next month's, counted from its day.
    ended(1.0, "gpu16", at=next_month)
    assert month_gpu_s(store.client, store.keys, "acme") == 22.25
    first_of_next = dt.datetime.fromtimestamp(next_month, dt.UTC).date()
    assert month_gpu_s(store.client, store.keys, "acme", today=first_of_next) == 1.0
    assert month_gpu_s(store.client, store.keys, "nobody") == 0.0


def test_a_query_is_the_month_to_date_by_default_and_at_most_max_days() -> None:
    today = dt.date(2026, 12, 6)

    assert query_range(None, None, 92, today) == (dt.date(2026, 12, 1), today)
    assert query_range(None, dt.date(2026, 3, 31), 92) == (dt.date(2026, 3, 1), dt.date(2026, 3, 31))
    assert query_range(None, today, 3, today) == (dt.date(2026, 12, 4), today)  # clipped to max_days
    # The edge: max_days days is one query; one more is refused, naming the setting.
    assert query_range(dt.date(2026, 9, 6), today, 92, today) == (dt.date(2026, 9, 6), today)
    with pytest.raises(InvalidRequest) as longer:
        query_range(dt.date(2026, 9, 5), today, 92, today)
    [error] = longer.value.errors
    assert error.field == "start" and "93 days" in error.message and "FLEET_USAGE_MAX_DAYS" in error.message
    with pytest.raises(InvalidRequest, match="after end"):
        query_range(dt.date(2026, 12, 7), today, 92, today)

"""The GPU-busy share's arithmetic: pipeline seconds over seconds with work queued for the GPU,
where overlapped jobs count once, a gap counts only while the next job was already waiting, and
the encode of a job nothing waits behind is not counted."""

from __future__ import annotations

import pytest

from worker.busy import BusyMeter, share


def test_overlapped_jobs_count_once_and_only_gaps_with_a_job_waiting_count() -> None:
    meter = BusyMeter()
    meter._idle_since = 100.0  # the worker became idle at t=100
    # Job A waited since t=90 (before the worker was free): the gap 100..101 counts.
    meter.job_started(claimed_at=101.0, waiting_since=90.0)
    meter.pipeline(4.0)
    meter.gpu_done(now=105.0)  # A is encoded and stored from here on: CPU work
    # Job B was queued at t=95, so it waited behind A's encode: the 0.5 s gap counts.
    meter.job_started(claimed_at=105.5, waiting_since=95.0)
    meter.pipeline(4.0)
    meter.gpu_done(now=109.5)  # the stretch 101..109.5, with B's encode after it not counted
    assert meter.take_new() == (8.0, pytest.approx(9.5))
    # Job C was queued at t=130, long after B: the worker was idle for want of work until then.
    meter.job_started(claimed_at=131.0, waiting_since=130.0)
    meter.pipeline(2.0)
    assert meter.take_new(now=133.0) == (2.0, pytest.approx(3.0))  # 1 s gap + 2 s so far
    meter.gpu_done(now=134.0)
    assert meter.take_new() == (0.0, pytest.approx(1.0))
    busy_s, work_s = meter.totals()
    assert (busy_s, work_s) == (10.0, pytest.approx(13.5))
    assert share(busy_s, work_s) == pytest.approx(10 / 13.5, abs=1e-4)
    assert share(0.0, 0.0) is None


def test_sequential_encode_counts_only_while_a_job_waits_behind_it() -> None:
    meter = BusyMeter()
    meter._idle_since = 0.0
    # Two jobs queued at t=0, run one after the other with a 1 s encode between: the first
    # job's encode held the second back (counted); the second's, with nothing behind it, is not.
    meter.job_started(claimed_at=0.0, waiting_since=0.0)
    meter.pipeline(2.0)
    meter.gpu_done(now=2.0)
    meter.job_started(claimed_at=3.0, waiting_since=0.0)
    meter.pipeline(2.0)
    meter.gpu_done(now=5.0)
    assert meter.totals() == (4.0, pytest.approx(5.0))

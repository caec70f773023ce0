"""The GPU-busy share's arithmetic: pipeline seconds over seconds with work, where overlapped
jobs count once and an idle gap counts only while the next job was already waiting."""

from __future__ import annotations

import pytest

from worker.busy import BusyMeter, share


def test_overlapped_jobs_count_once_and_only_gaps_with_a_job_waiting_count() -> None:
    meter = BusyMeter()
    meter._idle_since = 100.0  # the worker became idle at t=100
    # Job A waited since t=90 (before the worker was free): the gap 100..101 counts.
    meter.job_started(claimed_at=101.0, waiting_since=90.0)
    meter.pipeline(4.0)
    # Job B claimed while A is still finishing: one stretch of work, not two.
    meter.job_started(claimed_at=105.0, waiting_since=95.0)
    meter.job_ended(now=106.0)  # A recorded
    meter.pipeline(4.0)
    meter.job_ended(now=110.0)  # B recorded: the stretch 101..110 is 9 s
    assert meter.take_new() == (8.0, pytest.approx(10.0))
    # Job C was queued at t=130, long after B: the worker was idle for want of work until then.
    meter.job_started(claimed_at=131.0, waiting_since=130.0)
    meter.pipeline(2.0)
    assert meter.take_new(now=133.0) == (2.0, pytest.approx(3.0))  # 1 s gap + 2 s so far
    meter.job_ended(now=134.0)
    assert meter.take_new() == (0.0, pytest.approx(1.0))
    busy_s, work_s = meter.totals()
    assert (busy_s, work_s) == (10.0, pytest.approx(14.0))
    assert share(busy_s, work_s) == pytest.approx(10 / 14, abs=1e-4)
    assert share(0.0, 0.0) is None

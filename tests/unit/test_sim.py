"""The fleet simulation: the subscription rules on hand-made cases, then invariants of a small
random fleet (determinism, every job finished exactly once, spillover helping small jobs)."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from routing.catalog import TaskKind
from routing.classes import VramClass, consumed_queues
from routing.planning.plan import load_job_costs
from routing.planning.sim import DEFAULT_MIX, SimJob, generate_jobs, own_queues, service_means, simulate

ROOT = Path(__file__).resolve().parents[2]
GPU16, GPU80, H100X8 = VramClass.GPU16, VramClass.GPU80, VramClass.H100X8
SMALL_FLEET = {GPU16: 6, GPU80: 3, H100X8: 1}

# Hand-made service times: a Z-Image job takes 10 s on gpu16 and 2 s on a bigger worker, a
# Qwen-Image job 50 s.
Z, QWEN = ("z-image-turbo", TaskKind.TEXT_TO_IMAGE), ("qwen-image", TaskKind.TEXT_TO_IMAGE)
MEANS = {(*Z, GPU16): 10.0, (*Z, GPU80): 2.0, (*Z, H100X8): 2.0, (*QWEN, GPU80): 50.0, (*QWEN, H100X8): 50.0}


def _job(job_id: int, arrival_s: float, kind: tuple[str, TaskKind]) -> SimJob:
    return SimJob(job_id, arrival_s, kind[0], kind[1], size_factor=1.0)


def _means() -> dict:
    return service_means(load_job_costs(), [(m, k) for m, k, _ in DEFAULT_MIX])


def _run(seed: int, spillover: bool, jobs: int = 600, rate_per_s: float = 0.1):
    return simulate(generate_jobs(jobs, rate_per_s, seed), SMALL_FLEET, _means(), spillover=spillover)


def test_an_idle_bigger_worker_takes_a_small_job_only_with_spillover() -> None:
    jobs = [_job(0, 0.0, Z), _job(1, 1.0, Z)]
    workers = {GPU16: 1, GPU80: 1}
    spill = simulate(jobs, workers, MEANS, spillover=True)
    # The gpu16 worker has waited as long as the gpu80 one at t=0 and has the lower id; the
    # second job finds only the gpu80 worker idle and runs there in 2 s.
    assert [(o.worker_class, o.start_s, o.end_s) for o in spill.outcomes] == [
        (GPU16, 0.0, 10.0),
        (GPU80, 1.0, 3.0),
    ]
    alone = simulate(jobs, workers, MEANS, spillover=False)
    assert [(o.worker_class, o.start_s) for o in alone.outcomes] == [(GPU16, 0.0), (GPU16, 10.0)]


def test_a_freed_bigger_worker_takes_its_own_queue_first() -> None:
    # Both workers busy until t=10 (gpu16) and t=50 (gpu80); meanwhile a Z-Image job (t=2) and a
    # Qwen-Image job (t=3) queue. At t=10 the gpu16 worker takes the Z-Image job; at t=50 the
    # gpu80 worker takes Qwen-Image although a later Z-Image job (t=20) waits, and the gpu16
    # worker, free at t=20, takes that one.
    jobs = [_job(0, 0.0, Z), _job(1, 0.0, QWEN), _job(2, 2.0, Z), _job(3, 3.0, QWEN), _job(4, 20.0, Z)]
    result = simulate(jobs, {GPU16: 1, GPU80: 1}, MEANS, spillover=True)
    runs = {o.job.job_id: (o.worker_class, o.start_s) for o in result.outcomes}
    assert runs == {0: (GPU16, 0.0), 1: (GPU80, 0.0), 2: (GPU16, 10.0), 3: (GPU80, 50.0), 4: (GPU16, 20.0)}


def test_a_freed_bigger_worker_drains_smaller_queues_when_its_own_is_empty() -> None:
    # gpu80 runs Qwen-Image 0-50 while nine Z-Image jobs pile up on gpu16 (10 s each there). At
    # t=50 both workers come free: the gpu16 worker (lower id) takes job 6, the gpu80 worker
    # finds its own queue empty and takes jobs 7, 8 and 9 from gpu16's at 2 s each.
    jobs = [_job(0, 0.0, QWEN), _job(1, 0.0, Z)] + [_job(i, 1.0, Z) for i in range(2, 10)]
    result = simulate(jobs, {GPU16: 1, GPU80: 1}, MEANS, spillover=True)
    runs = {o.job.job_id: (o.worker_class, o.start_s) for o in result.outcomes}
    assert [runs[i] for i in range(1, 10)] == [
        (GPU16, 0.0),
        (GPU16, 10.0),
        (GPU16, 20.0),
        (GPU16, 30.0),
        (GPU16, 40.0),
        (GPU16, 50.0),
        (GPU80, 50.0),
        (GPU80, 52.0),
        (GPU80, 54.0),
    ]


def test_a_queue_no_worker_consumes_is_an_error_not_a_silent_loss() -> None:
    with pytest.raises(ValueError, match="no worker in this fleet consumes them"):
        simulate([_job(0, 0.0, QWEN)], {GPU16: 2}, MEANS)


def test_own_queues_split_consumed_queues_by_class() -> None:
    # A worker without spillover consumes its class's queues alone; with it, those and then each
    # smaller class's, biggest first.
    for vram_class in VramClass:
        assert vram_class.queue in own_queues(vram_class)
        smaller = sorted((c for c in VramClass if c.rank < vram_class.rank), key=lambda c: -c.rank)
        assert consumed_queues(vram_class) == own_queues(vram_class) + [
            q for c in smaller for q in own_queues(c)
        ]


def test_same_seed_same_run_other_seed_other_run() -> None:
    first, again, other = _run(7, True), _run(7, True), _run(8, True)
    key = [(o.job.job_id, o.worker_id, o.start_s, o.end_s) for o in first.outcomes]
    assert key == [(o.job.job_id, o.worker_id, o.start_s, o.end_s) for o in again.outcomes]
    assert key != [(o.job.job_id, o.worker_id, o.start_s, o.end_s) for o in other.outcomes]


@pytest.mark.parametrize("spillover", [False, True])
def test_every_job_finishes_exactly_once_where_it_may_run(spillover: bool) -> None:
    result = _run(3, spillover)
    assert sorted(o.job.job_id for o in result.outcomes) == list(range(600))
    by_worker = defaultdict(list)
    for o in result.outcomes:
        assert o.start_s >= o.job.arrival_s and o.end_s > o.start_s
        allowed = consumed_queues(o.worker_class) if spillover else own_queues(o.worker_class)
        assert o.job.queue in allowed
        by_worker[o.worker_id].append((o.start_s, o.end_s))
    for spans in by_worker.values():  # one job at a time per worker
        spans.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))


def test_spillover_lowers_the_small_class_p95_wait() -> None:
    # 0.1 jobs/s keeps the six gpu16 workers backlogged (offered load above 1) while gpu80 and
    # h100x8 have time to spare.
    alone, spill = _run(5, False), _run(5, True)
    assert alone.wait_percentile(GPU16, 95) > 600  # a real backlog without spillover
    assert spill.wait_percentile(GPU16, 95) < 0.5 * alone.wait_percentile(GPU16, 95)
    assert spill.busy_share(GPU80) > spill.busy_share(GPU80, GPU80)  # gpu80 ran gpu16 jobs
    assert alone.busy_share(GPU80) == pytest.approx(alone.busy_share(GPU80, GPU80))


def test_bench_prints_the_ratio() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "bench/fleet_sim.py",
            "--jobs",
            "2000",
            "--gpu16",
            "20",
            "--gpu80",
            "8",
            "--h100x8",
            "2",
            "--rate-per-s",
            "0.3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "p95 wait, spillover / own queue only" in result.stdout
    ratio_line = next(
        line for line in result.stdout.splitlines() if line.strip().startswith("gpu16 ") and "->" in line
    )
    assert float(ratio_line.split()[1]) < 1

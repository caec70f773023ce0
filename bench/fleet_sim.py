"""Fleet simulation: do big workers taking small jobs (spillover) help small jobs, and at what
cost to the big classes' own jobs?

Runs the same jobs (Poisson arrivals, the assumed mix in ``routing.planning.sim.DEFAULT_MIX``, service
times from ``routing/planning/data/gpu_seconds.csv``) through the same fleet twice: workers consuming
their own queue only (the baseline), then their own queue first and smaller classes' after, as
``routing.classes.consumed_queues`` says. Prints GPU busy share per class while jobs keep
arriving, p50/p95 queue wait per class, and the ratio of each class's p95 wait with spillover
to the baseline's.

    .venv/bin/python bench/fleet_sim.py [--jobs 10000] [--rate-per-s 1.1] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing.classes import VramClass  # noqa: E402
from routing.planning.plan import load_job_costs  # noqa: E402
from routing.planning.sim import DEFAULT_MIX, SimResult, generate_jobs, service_means, simulate  # noqa: E402

CLASSES = sorted(VramClass, key=lambda c: c.rank)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 60 else f"{seconds / 60:,.1f}m"


def _offered_load(result: SimResult, vram_class: VramClass, means: dict) -> float:
    """Work queued on a class over what its own workers can do while jobs arrive."""
    work = sum(
        means[(o.job.model, o.job.kind, vram_class)] * o.job.size_factor
        for o in result.outcomes
        if o.job.vram_class is vram_class
    )
    return work / (result.workers[vram_class] * result.window_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rate-per-s", type=float, default=1.1, help="mean arrivals per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gpu16", type=int, default=64, help="gpu16 workers")
    parser.add_argument("--gpu80", type=int, default=34, help="gpu80 workers")
    parser.add_argument("--h100x8", type=int, default=6, help="h100x8 workers")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    workers = {VramClass.GPU16: args.gpu16, VramClass.GPU80: args.gpu80, VramClass.H100X8: args.h100x8}
    jobs = generate_jobs(args.jobs, args.rate_per_s, args.seed)
    means = service_means(load_job_costs(), [(m, k) for m, k, _ in DEFAULT_MIX])
    baseline = simulate(jobs, workers, means, spillover=False)
    spill = simulate(jobs, workers, means, spillover=True)
    elapsed = time.perf_counter() - started

    for result in (baseline, spill):
        finished = sorted(o.job.job_id for o in result.outcomes)
        assert finished == list(range(args.jobs)), "a job was lost or ran twice"

    print(
        f"{sum(workers.values())} workers ({', '.join(f'{c} {n}' for c, n in workers.items())}), "
        f"{args.jobs:,} jobs, Poisson arrivals at {args.rate_per_s:g}/s over "
        f"{_minutes(baseline.window_s)}, seed {args.seed}"
    )
    print(
        "offered load over own-class capacity: "
        + ", ".join(f"{c} {_offered_load(baseline, c, means):.2f}" for c in CLASSES)
    )
    print()
    header = f"{'class':<7}{'jobs':>6}  {'run':<15}{'busy':>6}{'(own + spilled in)':>20}{'wait p50':>11}{'wait p95':>11}"
    print(header)
    for c in CLASSES:
        count = len(baseline.waits(c))
        for name, result in (("own queue only", baseline), ("spillover", spill)):
            own = result.busy_share(c, c)
            spilled = result.busy_share(c) - own
            print(
                f"{c.value:<7}{count:>6,}  {name:<15}{result.busy_share(c):>6.0%}"
                f"{f'({own:.0%} + {spilled:.0%})':>20}"
                f"{_minutes(result.wait_percentile(c, 50)):>11}{_minutes(result.wait_percentile(c, 95)):>11}"
            )
    print("busy: share of the class's GPU time spent in jobs while jobs arrive; an h100x8 worker")
    print("running a smaller job on one GPU counts all eight busy, since the other seven wait with it.")
    print()
    print("p95 wait, spillover / own queue only (below 1: spillover helps that class):")
    for c in CLASSES:
        before, after = baseline.wait_percentile(c, 95), spill.wait_percentile(c, 95)
        ratio = f"{after / before:.3f}" if before > 0 else "n/a (no wait without spillover)"
        print(f"  {c.value:<7}{ratio}   ({_minutes(before)} -> {_minutes(after)})")
    print(
        f"last job done: {_minutes(baseline.makespan_s)} own queue only, {_minutes(spill.makespan_s)} spillover"
    )
    print(f"simulated both runs in {elapsed:.2f} s")


if __name__ == "__main__":
    main()

"""A discrete-event simulation of the fleet's queues and the workers that consume them.

It models the rules the fleet runs by, nothing finer:

- a job is queued at normal priority on its catalog class's queue (``routing.planning.plan.home_class``)
  and leaves it in arrival order (Celery's Redis lists are FIFO);
- a worker runs one job at a time (prefetch 1, concurrency 1);
- a worker that comes free polls ``routing.classes.consumed_queues(its class)`` in that order:
  its own class's queues first, then each smaller class's, biggest first. Without spillover it
  polls its own class's queues only;
- a job that arrives while workers wait goes to the one that has waited longest among those
  subscribed to its queue (Redis serves blocked BRPOP clients first come, first served).

Service times come from ``routing/planning/data/gpu_seconds.csv``: a job runs on a worker of class ``w``
for the wall time of the row of its model and kind on the biggest class up to ``w`` that has one
(an h100x8 worker runs a gpu80 job on one of its GPUs, and holds the rest meanwhile). Each job
draws one size factor (lognormal, mean 1) that scales its time on whichever worker runs it, so
runs with and without spillover see the very same jobs.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from routing.catalog import TaskKind
from routing.classes import VramClass, consumed_queues
from routing.planning.plan import JobCost, home_class

# Share of jobs per (model, kind). The catalog carries no traffic figures: this is an assumed
# mix, mostly cheap images with a tail of long videos, which is what makes spillover matter.
DEFAULT_MIX: tuple[tuple[str, TaskKind, float], ...] = (
    ("z-image-turbo", TaskKind.TEXT_TO_IMAGE, 0.70),
    ("wan2.2-ti2v-5b", TaskKind.TEXT_TO_VIDEO, 0.04),
    ("wan2.2-ti2v-5b", TaskKind.IMAGE_TO_VIDEO, 0.03),
    ("qwen-image", TaskKind.TEXT_TO_IMAGE, 0.08),
    ("qwen-image-edit", TaskKind.EDIT, 0.05),
    ("qwen-image-edit-2509", TaskKind.EDIT, 0.05),
    ("wan2.2-animate-14b", TaskKind.ANIMATE, 0.03),
    ("wan2.2-s2v-14b", TaskKind.SPEECH_TO_VIDEO, 0.02),
)

_CLASSES = sorted(VramClass, key=lambda c: c.rank)


@dataclass(frozen=True)
class SimJob:
    job_id: int
    arrival_s: float
    model: str
    kind: TaskKind
    size_factor: float

    @property
    def vram_class(self) -> VramClass:
        return home_class(self.model)

    @property
    def queue(self) -> str:
        # Submitted at normal priority: the class's own queue.
        return self.vram_class.queue


@dataclass(frozen=True)
class Outcome:
    job: SimJob
    worker_id: int
    worker_class: VramClass
    start_s: float
    end_s: float

    @property
    def wait_s(self) -> float:
        return self.start_s - self.job.arrival_s


@dataclass
class SimResult:
    workers: Mapping[VramClass, int]
    spillover: bool
    outcomes: list[Outcome]
    # The backlog window: from the first arrival to the last, while work keeps coming.
    window_s: float
    # Seconds each worker class spent running each job class inside the window.
    busy_s: dict[VramClass, dict[VramClass, float]] = field(default_factory=dict)

    def waits(self, job_class: VramClass) -> list[float]:
        return sorted(o.wait_s for o in self.outcomes if o.job.vram_class is job_class)

    def wait_percentile(self, job_class: VramClass, q: float) -> float:
        """Nearest-rank percentile ``q`` (0-100) of the wait of jobs queued on ``job_class``."""
        waits = self.waits(job_class)
        if not waits:
            return 0.0
        return waits[max(0, math.ceil(q / 100 * len(waits)) - 1)]

    def busy_share(self, worker_class: VramClass, job_class: VramClass | None = None) -> float:
        """Share of ``worker_class``'s worker-time in the window spent on jobs (of ``job_class``)."""
        capacity = self.workers.get(worker_class, 0) * self.window_s
        if capacity == 0:
            return 0.0
        spent = self.busy_s.get(worker_class, {})
        busy = spent.get(job_class, 0.0) if job_class is not None else sum(spent.values())
        return busy / capacity

    @property
    def makespan_s(self) -> float:
        return max(o.end_s for o in self.outcomes)


def own_queues(vram_class: VramClass) -> list[str]:
    """The queues of ``vram_class`` alone: what its workers consume without spillover."""
    smaller = [c for c in _CLASSES if c.rank == vram_class.rank - 1]
    theirs = set(consumed_queues(smaller[0])) if smaller else set()
    return [q for q in consumed_queues(vram_class) if q not in theirs]


def generate_jobs(
    count: int,
    arrival_rate_per_s: float,
    seed: int,
    mix: Sequence[tuple[str, TaskKind, float]] = DEFAULT_MIX,
    size_sigma: float = 0.25,
) -> list[SimJob]:
    """``count`` jobs with Poisson arrivals, types drawn from ``mix``, and size factors."""
    rng = random.Random(seed)
    types = [(model, kind) for model, kind, _ in mix]
    weights = [w for _, _, w in mix]
    jobs: list[SimJob] = []
    t = 0.0
    for job_id in range(count):
        t += rng.expovariate(arrival_rate_per_s)
        model, kind = rng.choices(types, weights)[0]
        # Mean 1, so the table's figure stays the mean service time.
        factor = rng.lognormvariate(-(size_sigma**2) / 2, size_sigma)
        jobs.append(SimJob(job_id, t, model, kind, factor))
    return jobs


def service_means(
    costs: Mapping[tuple[str, TaskKind, VramClass], JobCost], types: Sequence[tuple[str, TaskKind]]
) -> dict[tuple[str, TaskKind, VramClass], float]:
    """Mean wall seconds of each job type on each class of worker that may run it."""
    means: dict[tuple[str, TaskKind, VramClass], float] = {}
    for model, kind in types:
        home = home_class(model)
        for worker_class in _CLASSES:
            if worker_class.rank < home.rank:
                continue
            fits = [
                c for c in _CLASSES if home.rank <= c.rank <= worker_class.rank and (model, kind, c) in costs
            ]
            if not fits:
                raise ValueError(f"no GPU-seconds figure for {model}:{kind} on {home} or above")
            means[(model, kind, worker_class)] = costs[(model, kind, fits[-1])].wall_seconds
    return means


def simulate(
    jobs: Sequence[SimJob],
    workers: Mapping[VramClass, int],
    means: Mapping[tuple[str, TaskKind, VramClass], float],
    spillover: bool = True,
) -> SimResult:
    """Run ``jobs`` through a fleet of ``workers`` per class; every job runs exactly once."""
    worker_class: list[VramClass] = []
    for vram_class in _CLASSES:
        worker_class += [vram_class] * workers.get(vram_class, 0)
    subscriptions = [tuple(consumed_queues(c) if spillover else own_queues(c)) for c in worker_class]
    queues: dict[str, deque[SimJob]] = {q: deque() for c in _CLASSES for q in consumed_queues(c)}
    # Idle workers by the time they went idle: the longest-waiting one is served first.
    idle_since: dict[int, float] = {w: 0.0 for w in range(len(worker_class))}
    running: list[tuple[float, int, int]] = []  # (end, worker, seq) heap
    outcomes: list[Outcome] = []
    ordered = sorted(jobs, key=lambda j: (j.arrival_s, j.job_id))

    def start(worker: int, job: SimJob, now: float) -> None:
        duration = means[(job.model, job.kind, worker_class[worker])] * job.size_factor
        outcomes.append(Outcome(job, worker, worker_class[worker], now, now + duration))
        heapq.heappush(running, (now + duration, worker, len(outcomes) - 1))

    next_arrival = 0
    while next_arrival < len(ordered) or running:
        arrival = ordered[next_arrival].arrival_s if next_arrival < len(ordered) else math.inf
        # A worker that finishes at the moment a job arrives polls before the job is offered.
        if running and running[0][0] <= arrival:
            now, worker, _ = heapq.heappop(running)
            for queue in subscriptions[worker]:
                if queues[queue]:
                    start(worker, queues[queue].popleft(), now)
                    break
            else:
                idle_since[worker] = now
            continue
        job = ordered[next_arrival]
        next_arrival += 1
        waiting = [w for w in idle_since if job.queue in subscriptions[w]]
        if waiting:
            worker = min(waiting, key=lambda w: (idle_since[w], w))
            del idle_since[worker]
            start(worker, job, arrival)
        else:
            queues[job.queue].append(job)

    if len(outcomes) != len(ordered):
        stuck = sorted({q for q, waiting in queues.items() if waiting})
        raise ValueError(f"jobs left on {', '.join(stuck)}: no worker in this fleet consumes them")
    window_s = ordered[-1].arrival_s if ordered else 0.0
    busy_s: dict[VramClass, dict[VramClass, float]] = {c: {} for c in _CLASSES}
    for o in outcomes:
        overlap = max(0.0, min(o.end_s, window_s) - o.start_s)
        spent = busy_s[o.worker_class]
        spent[o.job.vram_class] = spent.get(o.job.vram_class, 0.0) + overlap
    return SimResult(dict(workers), spillover, outcomes, window_s, busy_s)

"""Queue position and ETA, from what is ahead of a job and how long jobs have been taking.

Workers write two things: a moving average of run time per model and class (after each success)
and a heartbeat naming their class. A queued job's position is the number of jobs ahead of it in
its class's queues (higher priorities first, then its own queue in arrival order); its ETA is
that line shared among the live workers that consume the queue, times the model's measured run
time, plus its own run. The line is priced at the job's own model's time: jobs ahead of other
models on the same class are not looked up one by one, so the ETA is an estimate, not a promise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from routing.classes import VramClass, class_queues, consumed_queues, parse_queue
from routing.jobs.codecs import encode_label
from routing.jobs.keys import Keys
from routing.jobs.record import JobRecord, JobStatus
from routing.jobs.workers import live_workers

# Weight of the newest run in the moving average: recent enough to follow a change of hardware
# or settings within a few dozen jobs, smooth enough that one slow job does not swing it.
_EWMA_WEIGHT = 0.2

_RECORD = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local value = tonumber(ARGV[2])
if old then value = old + tonumber(ARGV[3]) * (value - old) end
redis.call('HSET', KEYS[1], ARGV[1], tostring(value))
return tostring(value)
"""


def record_duration(
    client: redis.Redis, keys: Keys, model: str, vram_class: VramClass, seconds: float
) -> None:
    client.eval(_RECORD, 1, keys.durations, encode_label(model, vram_class.value), seconds, _EWMA_WEIGHT)


@dataclass(frozen=True)
class Estimate:
    position: int | None  # jobs ahead in line; None unless queued
    eta_s: float | None  # seconds until the job should finish; None without measurements


@dataclass(frozen=True)
class Fleet:
    """What every job's estimate shares: the measured run times and the live workers' classes.
    Read once per request (``read_fleet``), so listing a page of jobs costs a few commands per
    job, whatever else is in Redis."""

    run_s: dict[str, float]  # "<model>|<class>" -> moving average of run seconds
    workers: list[VramClass]  # one entry per live worker

    def measured_s(self, model: str, vram_class: VramClass) -> float | None:
        return self.run_s.get(encode_label(model, vram_class.value))


def read_fleet(client: redis.Redis, keys: Keys) -> Fleet:
    run_s = {k.decode(): float(v) for k, v in client.hgetall(keys.durations).items()}
    return Fleet(run_s, list(live_workers(client, keys).values()))


def estimate(client: redis.Redis, keys: Keys, record: JobRecord, fleet: Fleet | None = None) -> Estimate:
    """The job's place in line and ETA; ``fleet`` is read here when not given (pass one read
    per request when estimating many jobs)."""
    if record.status.is_terminal():
        return Estimate(None, None)
    fleet = fleet or read_fleet(client, keys)
    vram_class = parse_queue(record.queue)[0]
    run_s = fleet.measured_s(record.model, vram_class)
    if record.status is JobStatus.RUNNING:
        if run_s is None or record.started_at is None:
            return Estimate(None, None)
        return Estimate(None, max(run_s - (time.time() - record.started_at), 0.0))

    line = class_queues(vram_class)
    ahead_queues = line[: line.index(record.queue)] if record.queue in line else []
    with client.pipeline(transaction=False) as pipe:
        pipe.zrank(keys.queued(record.queue), record.id)
        for queue in ahead_queues:
            pipe.zcard(keys.queued(queue))
        rank, *cards = pipe.execute()
    if rank is None:  # left the line between the two reads
        return Estimate(None, None)
    position = int(rank) + sum(int(c) for c in cards)
    if run_s is None:
        return Estimate(position, None)
    workers = sum(1 for c in fleet.workers if record.queue in consumed_queues(c))
    # No live worker: the job waits for one to start; no honest number to give.
    if workers == 0:
        return Estimate(position, None)
    return Estimate(position, (position / workers + 1) * run_s)

"""Soak: many small jobs through GPU workers that keep getting killed, then a check of the ledger.

    python -m tests.faults.soak --jobs 500

Starts a Redis of its own (append-only file, on a free loopback port), a webhook receiver on
127.0.0.2, a ``python -m worker.webhooks`` worker and ``--workers`` GPU workers (gpu16, the real
Z-Image adapter on the small local model). Submits ``--jobs`` jobs (64x64, 2 steps), each with a
webhook for its completion, while a loop SIGKILLs the process group of a random GPU worker every
few seconds and starts a new one in its place. Every put to the object store takes
``--store-put-s`` (0.2 s) longer than it would (testkit/storage.py), so that a job's store,
which overlaps the next job's generation, is long enough for many kills to land in it. Once every job is finished (or ``--timeout-s``
runs out: it always stops by itself) it checks:

- every submitted id has a terminal record: succeeded, or failed/dead-lettered only after
  ``max_attempts`` deaths of its worker (the figures say how many);
- one stored output per succeeded job and nothing else under ``jobs/`` (and no job with a second
  ``job.succeeded`` event);
- one distinct completion webhook per finished job (by webhook-id and by job id), delivered to the
  receiver and verified.

- every stranded job (its message taken by a worker that was killed before it claimed the job:
  its record queued, its only message in Kombu's unacknowledged set) was taken up again (claimed,
  or dead-lettered at its attempt cap) within ``STRANDED_BOUND_S`` of the kill: the fleet's reaper
  gives such messages back at once (``worker.held``). A message a worker was killed taking, off
  its queue and not yet held, is put back by the workers' sweep (``worker.lost``; the figures say
  how many), and its job must finish like every other. The visibility timeout is the fleet's
  default (600 s, past the end of the run) and the soak restores nothing itself.

All traffic stays on loopback. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from localfleet.process import WorkerProcess
from producer.client import Client
from routing.celery_config import UNACKED_KEY
from routing.io.storage import LocalStorage
from routing.jobs.events import Webhook
from routing.jobs.messages import task_id
from routing.jobs.record import JobStatus
from routing.settings import Settings, Tenant
from testkit.storage import SLOW_WORKER
from tests import parallel
from tests.faults.harness import RedisServer, kill_group
from tests.webhook_receiver import Receiver
from worker import held
from worker.liveness import pid_of

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"soak-secret-for-loopback-only!!").decode()
FAST_RETRIES = {"FLEET_WEBHOOK_RETRY_BASE_S": "0.2", "FLEET_WEBHOOK_RETRY_CAP_S": "1"}
PNG = b"\x89PNG\r\n\x1a\n"
# A stranded job is taken up again within this of its worker's kill: a reaper's pass (a third of a
# heartbeat TTL) and a worker finishing the job in hand, with the margin a loaded machine needs;
# a tenth of the visibility timeout (600 s) that would otherwise bring its message back.
STRANDED_BOUND_S = 60.0


@dataclass
class Figures:
    jobs: int = 0
    workers: int = 0
    kills: int = 0
    kills_mid_job: int = 0
    kills_overlapped: int = 0  # while one job was being stored and the next one generated
    seconds: float = 0.0
    timed_out: bool = False
    statuses: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # error type -> count
    dead_letters: int = 0
    attempts: dict[int, int] = field(default_factory=dict)  # attempts -> jobs
    handed_back: int = 0
    stranded: int = 0  # held by a killed worker before claim (given back by a reaper)
    stranded_recovered_s: list[float] = field(default_factory=list)  # kill to taken up again
    lost_put_back: int = 0  # off the queue, not yet held, when their worker was killed (worker.lost)
    outputs: int = 0
    outputs_bad: int = 0  # stored but not a PNG
    outputs_missing: int = 0
    outputs_extra: int = 0
    temp_leftovers: int = 0  # partial uploads of killed workers (hidden temp files)
    double_completions: int = 0
    webhook_deliveries: int = 0
    webhook_unverified: int = 0
    webhooks_distinct: int = 0
    webhooks_missing: int = 0
    webhooks_wrong: int = 0  # webhook-id not the job's completion event, or a second one per job
    problems: list[str] = field(default_factory=list)

    @property
    def recovered_max_s(self) -> float:
        return max(self.stranded_recovered_s, default=0.0)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        def fmt(d: dict) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "none"

        return [
            f"jobs submitted:            {self.jobs} across {self.workers} GPU workers in {self.seconds:.0f} s"
            + (" (TIMED OUT)" if self.timed_out else ""),
            f"workers killed (SIGKILL):  {self.kills} ({self.kills_mid_job} while running a job, "
            f"{self.kills_overlapped} while storing one and generating the next)",
            f"terminal states:           {fmt(self.statuses)}",
            f"failures by type:          {fmt(self.failures)}; dead-lettered: {self.dead_letters}",
            f"attempts per job:          {fmt(self.attempts)}; handed back (their worker died): {self.handed_back}",
            f"stranded before claim:     {self.stranded} (message held by a killed worker), taken up "
            f"again {len(self.stranded_recovered_s)} within {self.recovered_max_s:.1f} s at most (bound "
            f"{STRANDED_BOUND_S:.0f} s), given back by a reaper",
            f"lost as taken:             {self.lost_put_back} (off the queue, not yet held, when the "
            "worker was killed), put back by a worker's sweep",
            f"outputs stored:            {self.outputs} (missing {self.outputs_missing}, extra "
            f"{self.outputs_extra}, not PNG {self.outputs_bad}; temp leftovers {self.temp_leftovers})",
            f"duplicate completions:     {self.double_completions}",
            f"completion webhooks:       {self.webhooks_distinct} distinct of {self.webhook_deliveries} "
            f"deliveries (missing {self.webhooks_missing}, wrong {self.webhooks_wrong}, "
            f"unverified {self.webhook_unverified})",
            "result:                    " + ("OK" if self.ok else "FAILED: " + "; ".join(self.problems)),
        ]


class Fleet:
    """The soak's processes: Redis, the webhook worker, the GPU workers (restartable slots)."""

    def __init__(self, base: Path, workers: int, small_models: Path, store_put_s: float = 0.0):
        self.base = base
        self.redis = RedisServer(base / "redis")
        self.redis.start()
        self.receiver = Receiver(SECRET)
        self.settings = Settings(
            redis_url=self.redis.url,
            key_prefix=f"soak-{uuid.uuid4().hex[:6]}",
            storage_backend="local",
            storage_dir=base / "objects",
            model_root=small_models,
            heartbeat_ttl_s=2.0,
            max_attempts=3,
            tenants={"soak": Tenant(api_keys=["soak-key"], webhook_secret=SECRET)},
            url_allow_cidrs=["127.0.0.2/32"],
        )
        self.worker_env = {"FAULT_STORE_PUT_S": str(store_put_s)}
        self.worker_module = SLOW_WORKER if store_put_s else "worker"
        self.webhooks = WorkerProcess(
            self.settings, base / "logs" / "webhooks.log", FAST_RETRIES, module="worker.webhooks"
        ).wait_ready(timeout_s=60)
        self.generation = [0] * workers
        self.slots = [self._start(i) for i in range(workers)]

    def _start(self, slot: int) -> WorkerProcess:
        self.generation[slot] += 1
        log = self.base / "logs" / f"gpu-{slot}-{self.generation[slot]}.log"
        return WorkerProcess(self.settings, log, self.worker_env, module=self.worker_module)

    def kill_and_restart(self, slot: int) -> None:
        kill_group(self.slots[slot])
        self.slots[slot].stop()  # closes its log
        self.slots[slot] = self._start(slot)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted((self.base / "logs").glob("gpu-*.log")))

    def close(self) -> None:
        for worker in self.slots:
            worker.stop(timeout_s=20)
        self.webhooks.stop(timeout_s=20)
        self.receiver.close()
        self.redis.stop()


def _statuses(client: Client, ids: list[str]) -> dict[str, str]:
    with client.store.client.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(client.keys.job(job_id), "status")
        values = pipe.execute()
    return {job_id: (v or b"").decode() for job_id, v in zip(ids, values, strict=True)}


def _parent_pid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
    except (OSError, StopIteration, ValueError):
        return None


def _running_on(client: Client, worker: WorkerProcess) -> int:
    """How many running jobs ``worker``'s pool child holds now (two: one storing, one generating)."""
    held = 0
    for job_id in client.store.running():
        owner = (client.store.client.hget(client.keys.job(job_id), "worker") or b"").decode()
        if owner and _parent_pid(str(pid_of(owner))) == worker.proc.pid:
            held += 1
    return held


def _held_unclaimed(client: Client, worker: WorkerProcess) -> list[str]:
    """The queued jobs whose messages ``worker``'s main process holds (``worker.held``)."""
    redis = client.store.client
    jobs = []
    for holder in held.holders(redis, client.keys):
        if pid_of(holder) != worker.proc.pid:
            continue
        for tag in redis.smembers(client.keys.held(holder)):
            raw = redis.hget(UNACKED_KEY, tag)
            if raw is not None:
                job_id = task_id(json.loads(raw)[0])
                if redis.hget(client.keys.job(job_id), "status") == b"queued":
                    jobs.append(job_id)
    return jobs


# What a worker's lost-message sweep logs (worker.lost).
_PUT_BACK = re.compile(r"put back the messages of jobs ([0-9a-f, ]+):")

# A queued job leaves the queue by a claim, or ends there: dead-lettered or expired when a worker
# takes its message, or canceled.
_LEFT_QUEUED = (b"job.started", b"job.failed", b"job.canceled")


def _left_queued_at(client: Client, job_id: str) -> list[float]:
    """When the job left ``queued``, each time (claimed, or ended while queued)."""
    entries = client.store.client.xrange(client.keys.job_events(job_id))
    return [float(fields[b"at"]) for _, fields in entries if fields[b"type"] in _LEFT_QUEUED]


def _stranded(client: Client, held_at_kill: dict[str, tuple[float, float]]) -> dict[str, float | None]:
    """Of the jobs a killed worker held unclaimed (job id -> when that was seen, when the worker
    was killed), the ones it still held when it died (not claimed in between), with the seconds
    from the kill to when a worker next took the job up (claimed it, or dead-lettered it at its
    attempt cap) (None: never)."""
    stranded: dict[str, float | None] = {}
    for job_id, (seen_at, killed_at) in held_at_kill.items():
        left = _left_queued_at(client, job_id)
        if any(seen_at < at <= killed_at for at in left):
            continue  # claimed between the look and the kill: not stranded
        later = [at - killed_at for at in left if at > killed_at]
        stranded[job_id] = min(later) if later else None
    return stranded


def run_soak(
    jobs: int = 500,
    workers: int = 2,
    kill_every_s: tuple[float, float] = (3.0, 7.0),
    timeout_s: float = 1800.0,
    base: Path | None = None,
    seed: int | None = None,
    log=print,
    store_put_s: float = 0.2,
) -> Figures:
    rng = random.Random(seed)
    started = time.monotonic()
    deadline = started + timeout_s
    small_models = ROOT / "var" / "small-models"
    parallel.small_models(small_models, ["z-image-turbo"])
    owned = base is None
    base = Path(tempfile.mkdtemp(prefix="fleet-soak-")) if base is None else base
    figures = Figures(jobs=jobs, workers=workers)
    fleet = Fleet(base, workers, small_models, store_put_s)
    client = Client(fleet.settings)
    stop = threading.Event()
    # Jobs a killed worker held unclaimed -> (when that was seen, when the worker was killed).
    held_at_kill: dict[str, tuple[float, float]] = {}
    try:
        request = {"model": "z-image-turbo", "width": 64, "height": 64, "steps": 2}
        webhook = Webhook(fleet.receiver.url("/done"), ("succeeded", "failed"))
        ids: list[str] = []
        for first in range(0, jobs, 100):
            batch = [
                request | {"prompt": f"soak {i}", "seed": i} for i in range(first, min(jobs, first + 100))
            ]
            ids += [j.id for j in client.submit_many(batch, webhook=webhook, tenant="soak")]
        log(f"soak: {len(ids)} jobs submitted to {workers} workers; logs in {base}")

        def killer() -> None:
            while not stop.wait(rng.uniform(*kill_every_s)):
                slot = rng.randrange(workers)
                running = _running_on(client, fleet.slots[slot])
                figures.kills_mid_job += running > 0
                figures.kills_overlapped += running > 1
                seen_at = time.time()
                unclaimed = _held_unclaimed(client, fleet.slots[slot])
                killed_at = time.time()
                fleet.kill_and_restart(slot)
                held_at_kill.update(dict.fromkeys(unclaimed, (seen_at, killed_at)))
                figures.kills += 1

        thread = threading.Thread(target=killer, name="killer", daemon=True)
        thread.start()

        # Until every job is finished, or the time is up.
        last_report = 0.0
        while True:
            statuses = _statuses(client, ids)
            done = sum(JobStatus(s).is_terminal() for s in statuses.values() if s)
            queued_now = sum(s == "queued" for s in statuses.values())
            if done == len(ids) or time.monotonic() > deadline:
                break
            if time.monotonic() - last_report > 15:
                log(f"soak: {done}/{len(ids)} finished, {queued_now} queued, {figures.kills} kills")
                last_report = time.monotonic()
            time.sleep(0.5)
        stop.set()
        thread.join()
        figures.timed_out = time.monotonic() > deadline

        stranded = _stranded(client, held_at_kill)
        figures.stranded = len(stranded)
        figures.stranded_recovered_s = sorted(s for s in stranded.values() if s is not None)
        late = [job_id for job_id, s in stranded.items() if s is None or s > STRANDED_BOUND_S]
        if late:
            figures.problems.append(
                f"{len(late)} stranded jobs not taken up again within {STRANDED_BOUND_S:.0f} s of the kill"
            )
        figures.lost_put_back = sum(len(found.split(", ")) for found in _PUT_BACK.findall(fleet.logs()))
        _check(fleet, client, ids, figures, deadline)
    finally:
        stop.set()
        figures.seconds = time.monotonic() - started
        fleet.close()
        if owned and figures.ok:
            shutil.rmtree(base, ignore_errors=True)
    return figures


def _check(fleet: Fleet, client: Client, ids: list[str], figures: Figures, deadline: float) -> None:
    problems = figures.problems
    if len(set(ids)) != figures.jobs:
        problems.append(f"{figures.jobs} submitted but {len(set(ids))} distinct ids")
    records = {}
    for job_id in ids:
        records[job_id] = client.get(job_id)
    statuses = collections.Counter(r.status.value for r in records.values())
    figures.statuses = dict(statuses)
    finished = [r for r in records.values() if r.status.is_terminal()]
    succeeded = [r for r in finished if r.status is JobStatus.SUCCEEDED]
    failed = [r for r in finished if r.status is JobStatus.FAILED]
    figures.failures = dict(collections.Counter(r.error.type for r in failed))
    figures.attempts = dict(collections.Counter(r.attempt for r in records.values()))
    figures.handed_back = sum(1 for r in records.values() if r.handed_back)
    dead = [json.loads(raw)["id"] for raw in client.store.client.lrange(client.keys.dead_letters, 0, -1)]
    figures.dead_letters = len(dead)
    if len(finished) != figures.jobs:
        problems.append(f"{figures.jobs - len(finished)} jobs not finished")
    if statuses.get("canceled"):
        problems.append(f"{statuses['canceled']} jobs canceled that nobody canceled")
    unexpected = [r for r in failed if r.error.type != "too_many_attempts"]
    if unexpected:
        problems.append(f"{len(unexpected)} failed other than too_many_attempts: {unexpected[0].error}")
    if sorted(dead) != sorted(r.id for r in failed if r.error.type == "too_many_attempts"):
        problems.append("dead-letter list does not match the too_many_attempts failures")

    # Outputs: exactly one per succeeded job, nothing else under jobs/.
    storage = LocalStorage(fleet.settings.storage_dir)
    stored = set(storage.list("jobs/"))
    expected = {f"jobs/{r.id}/attempt-{r.attempt}/output-0.png" for r in succeeded}
    recorded = {o.key for r in succeeded for o in r.outputs}
    figures.outputs = len(stored)
    figures.outputs_missing = len(expected - stored)
    figures.outputs_extra = len(stored - expected)
    if recorded != expected:
        problems.append("records name outputs other than jobs/<id>/attempt-<n>/output-0.png")
    figures.outputs_bad = sum(1 for key in stored & expected if not storage.get(key).startswith(PNG))
    root = Path(fleet.settings.storage_dir)
    figures.temp_leftovers = sum(
        1 for _, _, files in os.walk(root) for name in files if name.startswith(".") and name.endswith(".tmp")
    )
    if figures.outputs_missing or figures.outputs_extra or figures.outputs_bad:
        problems.append("stored outputs do not match the succeeded jobs")

    # Events: one completion per finished job.
    completions = collections.Counter()
    completion_event = {}
    for event in client.store.events(count=10_000_000):
        if event["type"] in ("job.succeeded", "job.failed", "job.canceled"):
            completions[event["job_id"]] += 1
            completion_event[event["job_id"]] = event["event_id"]
    figures.double_completions = sum(1 for n in completions.values() if n > 1)
    if figures.double_completions:
        problems.append(f"{figures.double_completions} jobs completed more than once")

    # Webhooks: one distinct, verified completion delivery per finished job.
    wanted = {r.id: completion_event.get(r.id) for r in finished}
    wait_until = min(deadline + 60, time.monotonic() + 60)

    def received() -> dict[str, dict]:
        return {**fleet.receiver.events("job.succeeded"), **fleet.receiver.events("job.failed")}

    while time.monotonic() < wait_until and len(received()) < len(wanted):
        time.sleep(0.2)
    got = received()
    by_job = collections.Counter(p["data"]["id"] for p in got.values())
    figures.webhook_deliveries = len(fleet.receiver.deliveries)
    figures.webhook_unverified = fleet.receiver.unverified
    figures.webhooks_distinct = len(got)
    figures.webhooks_missing = len(set(wanted) - set(by_job))
    figures.webhooks_wrong = sum(1 for n in by_job.values() if n > 1) + sum(
        1 for hook_id, p in got.items() if wanted.get(p["data"]["id"]) != hook_id
    )
    if figures.webhooks_missing or figures.webhooks_wrong or figures.webhook_unverified:
        problems.append("completion webhooks do not match the finished jobs")
    if figures.webhooks_distinct != len(finished):
        problems.append(f"{figures.webhooks_distinct} distinct completion webhooks for {len(finished)} jobs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(3.0, 7.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="stop by then, finished or not")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--store-put-s", type=float, default=0.2, help="added to every put to the object store"
    )
    parser.add_argument("--dir", type=Path, default=None, help="keep logs, Redis and objects here")
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    figures = run_soak(
        jobs=args.jobs,
        workers=args.workers,
        kill_every_s=tuple(args.kill_every),
        timeout_s=args.timeout_s,
        base=args.dir,
        seed=args.seed,
        store_put_s=args.store_put_s,
    )
    # The full run stands for kills that land mid-job and mid-store: one where none did proves
    # neither, whatever its ledger says.
    if not figures.kills_mid_job or not figures.kills_overlapped:
        figures.problems.append("no kill landed while a job ran, or none while one was stored")
    print("\n".join(figures.lines()))
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())

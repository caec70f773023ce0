"""Submit latency through the API with and without 100 live event streams open on the same API
process, in one run.

    python bench/sse.py [--streams 100] [--submits 200] [--events-per-s 2]

One uvicorn process serves both. The baseline is submit latency (``POST /v1/jobs``, one at a
time) with no stream open. Then ``--streams`` jobs each get a reader following
``GET /v1/jobs/{id}/events`` (in a process of their own), and a feeder writes each job's progress
through the job store as a worker would (``--events-per-s`` per job), while the same submits are
timed again. At the end the jobs succeed, every stream must end after its terminal event with
every event it was sent, and the ratio of the latencies is printed.
Runs against Redis database 1 under its own key prefix and deletes what it wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

# localfleet (the launchers) and the tests' helpers are not installed: imported from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import redis

from localfleet.process import ApiProcess
from routing.jobs import lifecycle
from routing.jobs.keys import Keys
from routing.jobs.record import JobStatus
from routing.jobs.store import JobStore
from routing.settings import Settings

REQUEST = {"model": "z-image-turbo", "kind": "text-to-image", "prompt": "a fox", "width": 64, "height": 64}
AUTH = {"Authorization": "Bearer bench-key"}


def submit_latencies_ms(url: str, n: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        for _ in range(n):
            started = time.perf_counter()
            response = http.post("/v1/jobs", json=REQUEST)
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 201, response.text
    return latencies


def read_streams(url: str, job_ids: list[str], connected: object, counts: object) -> None:
    """Child process: follow every job's events to the end; put {job id: events} on ``counts``."""

    async def follow(http: httpx.AsyncClient, job_id: str, seen: dict[str, int], ready: list[str]) -> None:
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    seen[job_id] = seen.get(job_id, 0) + 1
                    if seen[job_id] == 1:
                        ready.append(job_id)
                        if len(ready) == len(job_ids):
                            connected.set()

    ready: list[str] = []

    async def main() -> None:
        seen: dict[str, int] = {}
        limits = httpx.Limits(max_connections=len(job_ids) + 10)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120, limits=limits) as http:
            await asyncio.gather(*(follow(http, job_id, seen, ready) for job_id in job_ids))
        counts.put(seen)

    asyncio.run(main())


def feed(store: JobStore, job_ids: list[str], per_s: float, stop: threading.Event) -> int:
    """Move the jobs to running and write one progress step per job ``per_s`` times a second."""
    for job_id in job_ids:
        store.move(job_id, lifecycle.claim(store.get(job_id), "", time.time()))
    step = 0
    while not stop.is_set():
        step += 1
        for job_id in job_ids:
            store.progress(job_id, step, 1_000_000)
        stop.wait(1 / per_s)
    return step


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--submits", type=int, default=200)
    parser.add_argument("--events-per-s", type=float, default=2.0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("FLEET_BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    )
    args = parser.parse_args()

    prefix = f"sse-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-sse-"))
    settings = Settings(
        redis_url=args.redis_url,
        key_prefix=prefix,
        storage_dir=workdir / "objects",
        tenants={
            "bench": {
                "api_keys": ["bench-key"],
                "webhook_secret": "whsec_YmVuY2gtYmVuY2gtYmVuY2gtYmVuY2g=",
                "max_in_flight": 100_000,
            }
        },
    )
    raw = redis.Redis.from_url(args.redis_url)
    store = JobStore(raw, Keys(prefix), ttl_s=3600)
    try:
        with ApiProcess(settings, workdir / "api.log").wait_ready(60) as api:
            submit_latencies_ms(api.url, 50)  # warm the process, connections and scripts
            quiet = submit_latencies_ms(api.url, args.submits)

            with httpx.Client(base_url=api.url, headers=AUTH, timeout=30) as http:
                job_ids = [http.post("/v1/jobs", json=REQUEST).json()["id"] for _ in range(args.streams)]
            context = multiprocessing.get_context("spawn")
            connected, counts = context.Event(), context.Queue()
            reader = context.Process(target=read_streams, args=(api.url, job_ids, connected, counts))
            reader.start()
            assert connected.wait(60), "the streams did not all connect"
            stop = threading.Event()
            steps: list[int] = []
            feeder = threading.Thread(
                target=lambda: steps.append(feed(store, job_ids, args.events_per_s, stop)), daemon=True
            )
            feeder.start()
            time.sleep(1)
            busy = submit_latencies_ms(api.url, args.submits)
            stop.set()
            feeder.join()
            for job_id in job_ids:
                store.move(
                    job_id,
                    lifecycle.finish(JobStatus.SUCCEEDED, owner=None, attempt=None, finished_at=time.time()),
                )
            seen = counts.get(timeout=60)
            reader.join(30)
    finally:
        for key in raw.scan_iter(f"{prefix}:*", count=1000):
            raw.delete(key)
        raw.delete("gpu16")  # the submitted jobs' messages, as bench/enqueue.py does

    expected = 3 + steps[0]  # queued, started, every progress step, succeeded
    complete = sum(seen.get(job_id) == expected for job_id in job_ids)
    events = sum(seen.values())
    print(f"{args.streams} streams, {args.events_per_s:g} events/s each; {args.submits} submits per phase")
    print(f"submit without streams: p50 {pct(quiet, 50):.1f} ms, p95 {pct(quiet, 95):.1f} ms")
    print(f"submit with streams:    p50 {pct(busy, 50):.1f} ms, p95 {pct(busy, 95):.1f} ms")
    print(
        f"ratio with/without: p50 {pct(busy, 50) / pct(quiet, 50):.2f}, p95 {pct(busy, 95) / pct(quiet, 95):.2f}"
    )
    print(f"streams that got every event once and ended: {complete}/{args.streams} ({events} events)")


if __name__ == "__main__":
    main()

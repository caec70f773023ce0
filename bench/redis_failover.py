"""What Sentinel and ``FLEET_REDIS_MIN_REPLICAS`` cost a submit, and what a failover costs a
producer that keeps submitting.

    python bench/redis_failover.py [--jobs 2000] [--submitters 4]

Starts a Redis set of its own on loopback (a master, two replicas, three Sentinels: real
``redis-server`` processes, nothing shared with the suite or the demo) and runs single submits
through the Redis SDK (``producer.Client``):

- ``direct``: to the master's address, no Sentinel, no WAIT (the baseline, measured in the same
  run);
- ``sentinel``: the master the Sentinels name, no WAIT;
- ``sentinel+wait1``, ``sentinel+wait2``: a submit is answered once 1 (2) replicas hold it.

Each row prints submits per second and the median and 99th-percentile latency, with the ratio of
its rate to ``direct``'s. Then ``--submitters`` threads keep submitting with WAIT 1 while the
master is killed -9: it prints when every Sentinel names the promoted replica, how long the longest pause was (the Sentinels'
``down-after-milliseconds`` of 1 s plus the election, as a caller sees it), how many submits were
answered, how many were refused (503 in the API: ``NotReplicated`` or unreachable), and how many
of the answered ones the new master lacks (the point of the WAIT: 0).

Loopback replication answers in microseconds: across a network a WAIT costs one round trip to the
nearest replica. CPU figures from a development machine; they say nothing of a production
network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# The Redis set-up the fault tests run (tests.faults.harness) is imported from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from enqueue import REQUEST  # the submit bench/enqueue.py times, beside this script

from producer.client import Client
from routing.errors import Unavailable
from routing.settings import Settings
from tests.faults.harness import ReplicatedRedis


def _timed(client: Client, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        client.submit(REQUEST)
        latencies.append(time.perf_counter() - started)
    return latencies


def _row(name: str, latencies: list[float], baseline_rate: float | None) -> float:
    rate = len(latencies) / sum(latencies)
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    ratio = f"{rate / baseline_rate if baseline_rate else 1.0:.2f}x"
    print(
        f"{name:16s} {rate:8.0f} submits/s   median {statistics.median(latencies) * 1000:6.2f} ms   "
        f"p99 {p99 * 1000:6.2f} ms   {ratio:>6s} of direct"
    )
    return rate


def _failover(group: ReplicatedRedis, settings: Settings, submitters: int) -> None:
    answered: list[tuple[float, str]] = []
    refused = 0
    stop = threading.Event()
    lock = threading.Lock()

    def submit_loop() -> None:
        nonlocal refused
        with Client(settings) as client:
            while not stop.is_set():
                try:
                    job = client.submit(REQUEST)
                except Unavailable:
                    with lock:
                        refused += 1
                    continue
                with lock:
                    answered.append((time.monotonic(), job.id))

    threads = [threading.Thread(target=submit_loop) for _ in range(submitters)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    killed_at = time.monotonic()
    old, new = group.kill_master()
    promoted_s = time.monotonic() - killed_at
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join()
    times = sorted(t for t, _ in answered)
    longest = max(b - a for a, b in zip(times, times[1:], strict=False))
    with Client(settings) as client:
        missing = sum(client.store.client.exists(client.keys.job(job_id)) == 0 for _, job_id in answered)
    print(
        f"failover: master on :{old.port} killed -9, :{new.port} promoted and named by every Sentinel after {promoted_s:.1f} s; "
        f"longest pause between answered submits {longest:.2f} s"
    )
    print(f"          {len(answered)} submits answered, {refused} refused, {missing} answered but lost")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--submitters", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        group = ReplicatedRedis(Path(directory), replicas=2, sentinels=3)
        group.start()
        try:
            base = {"key_prefix": "bench-failover"}
            direct = Settings(redis_url=group.master().url, **base)
            through = {**base, "redis_url": "redis://sentinel/0", "redis_sentinels": group.addresses}
            rows = {
                "direct": direct,
                "sentinel": Settings(**through),
                "sentinel+wait1": Settings(**through, redis_min_replicas=1),
                "sentinel+wait2": Settings(**through, redis_min_replicas=2),
            }
            print(f"{args.jobs} single submits per row, one thread, Redis on loopback")
            baseline = None
            for name, settings in rows.items():
                with Client(settings) as client:
                    _timed(client, 200)  # warm the connection and the scripts
                    rate = _row(name, _timed(client, args.jobs), baseline)
                baseline = baseline or rate
            _failover(group, rows["sentinel+wait1"], args.submitters)
        finally:
            group.stop()


if __name__ == "__main__":
    main()

"""Submits per second from one process, against raw Redis LPUSH of the same payload.

    python bench/enqueue.py [--jobs 5000] [--batch 100]

The baseline is the cheapest possible enqueue: one LPUSH of the same message over the same kind
of connection. A submit does more (validation, routing, the job record, its event, the
idempotency check), all in one Lua round trip; ``submit_many`` pipelines a batch of those.

A tenant with a monthly GPU budget (``gpu_s_per_month``) has it checked on each submit, against
a month of usage: here every day of this month holds 120 usage fields (4 models, 2 classes, 3
ends, 5 measures). Timed: ``submit()`` with that budget against ``submit()`` without, and the
month's GPU-seconds as the check reads them (``month_gpu_s``: the month's own hash) against a
read of the month's day hashes (``read_usage``: what the check read before).
Runs against Redis database 1 under its own key prefix and deletes what it wrote.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
import uuid
from collections.abc import Callable

from producer.client import Client
from routing.io.connection import connect
from routing.jobs.codecs import encode_label
from routing.jobs.usage import MEASURES, day_number, month_gpu_s, month_start, next_month_at, read_usage
from routing.settings import Settings

REQUEST = {
    "model": "z-image-turbo",
    "prompt": "a red fox in the snow",
    "width": 1024,
    "height": 1024,
    "steps": 9,
}


def rate(n: int, run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return n / (time.perf_counter() - started)


def write_month_of_usage(raw, client: Client, tenant: str) -> None:
    """Every day of this month, a day's usage hash as a busy tenant's: 120 fields."""
    today = dt.datetime.now(dt.UTC).date()
    fields = {
        encode_label(model, vram_class, status, measure): 3
        for model in ("z-image-turbo", "qwen-image", "qwen-image-edit-2509", "wan2.2-ti2v-5b")
        for vram_class in ("gpu16", "gpu80")
        for status in ("succeeded", "failed", "canceled")
        for measure in MEASURES
    }
    for day in range(day_number(month_start(today)), int(next_month_at(today)) // 86_400):
        raw.hset(client.keys.usage(day, tenant), mapping=fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--redis-url", default=os.environ.get("FLEET_BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    )
    args = parser.parse_args()

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=args.redis_url, key_prefix=prefix)
    raw = connect(settings)
    client = Client(settings)
    _, payload = client._messages.run_job(uuid.uuid4().hex, "gpu16")
    queue = f"{prefix}:baseline"
    n, batch = args.jobs, args.batch
    try:
        for _ in range(200):  # warm connections, scripts and caches
            raw.lpush(queue, payload)
            client.submit(REQUEST)

        lpush = rate(n, lambda: [raw.lpush(queue, payload) for _ in range(n)])
        single = rate(n, lambda: [client.submit(REQUEST) for _ in range(n)])
        batched = rate(n, lambda: [client.submit_many([REQUEST] * batch) for _ in range(n // batch)])
        with raw.pipeline(transaction=False) as pipe:

            def lpush_batched() -> None:
                for _ in range(n // batch):
                    for _ in range(batch):
                        pipe.lpush(queue, payload)
                    pipe.execute()

            lpush_pipelined = rate(n, lpush_batched)

        # A budget far above the month's use: every submit is checked and taken.
        write_month_of_usage(raw, client, "budgeted")
        budget = {"tenant": "budgeted", "gpu_s_per_month": 1e12}
        client.submit(REQUEST, **budget)
        reads = n // 10
        today = dt.datetime.now(dt.UTC).date()
        by_days = rate(
            reads,
            lambda: [
                read_usage(raw, client.keys, "budgeted", month_start(today), today) for _ in range(reads)
            ],
        )
        by_month = rate(reads, lambda: [month_gpu_s(raw, client.keys, "budgeted") for _ in range(reads)])
        unbudgeted = rate(reads, lambda: [client.submit(REQUEST, tenant="budgeted") for _ in range(reads)])
        budgeted = rate(reads, lambda: [client.submit(REQUEST, **budget) for _ in range(reads)])
    finally:
        # The submitted jobs' messages went to the gpu16 queue of this database: remove them
        # with everything else this run wrote.
        for key in raw.scan_iter(f"{prefix}:*", count=1000):
            raw.delete(key)
        raw.delete("gpu16")

    print(f"payload {len(payload)} bytes, {n} jobs, batches of {batch}, Redis {args.redis_url}")
    print(f"raw LPUSH, one at a time         {lpush:8.0f} /s")
    print(f"submit(), one at a time          {single:8.0f} /s   ratio to LPUSH {single / lpush:.2f}")
    print(f"raw LPUSH, pipelined             {lpush_pipelined:8.0f} /s")
    print(
        f"submit_many(), pipelined         {batched:8.0f} /s   ratio to pipelined LPUSH {batched / lpush_pipelined:.2f}"
    )
    print(f"month's GPU-seconds, {today.day} days to date of 120 fields each:")
    print(f"  read from the day hashes       {by_days:8.0f} /s")
    print(
        f"  read from the month's hash     {by_month:8.0f} /s   ratio to the day hashes {by_month / by_days:.1f}"
    )
    print(f"submit() of a tenant, no budget  {unbudgeted:8.0f} /s")
    print(
        f"submit() of a tenant, budget     {budgeted:8.0f} /s   ratio to no budget {budgeted / unbudgeted:.2f}"
    )
    print(
        f"goal >= 3000 submits/s: single {'met' if single >= 3000 else 'NOT met'}, "
        f"batched {'met' if batched >= 3000 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()

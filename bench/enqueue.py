"""Submits per second from one process, against raw Redis LPUSH of the same payload.

    python bench/enqueue.py [--jobs 5000] [--batch 100]

The baseline is the cheapest possible enqueue: one LPUSH of the same message over the same kind
of connection. A submit does more (validation, routing, the job record, its event, the
idempotency check), all in one Lua round trip; ``submit_many`` pipelines a batch of those.
Runs against Redis database 1 under its own key prefix and deletes what it wrote.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Callable

from producer.client import Client
from routing.io.connection import connect
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
    print(
        f"goal >= 3000 submits/s: single {'met' if single >= 3000 else 'NOT met'}, "
        f"batched {'met' if batched >= 3000 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()

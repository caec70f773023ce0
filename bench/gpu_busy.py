"""GPU-busy share of a worker under a backlog: today's way (each job encoded, stored and recorded
before the next one starts) against the overlapped worker, in the same run.

    python bench/gpu_busy.py [--image-jobs 12] [--video-jobs 3] [--json]

The GPU is stood in for by an adapter that holds "the device" by sleeping (bench/sleep_adapter.py)
for T seconds and returns full-size outputs: T = 1 s image jobs (1024x1024, PNG) and T = 10 s video
jobs (1280x704, 121 frames, H.264 MP4); the image jobs run once with PNG and once with WebP outputs. For each kind and way, a gpu80 worker (it takes both
classes' queues) is started with the stand-in warm, the jobs are queued at once, and the share is
the worker's own figure: seconds inside pipeline calls over seconds with work (worker.busy), read
from its class's totals in Redis once the last job is recorded.

Sequential is ``FLEET_MAX_PENDING_OUTPUTS=0``; overlapped is the default (1). Uses Redis database
14 under its own key prefixes and a temporary object store. With ``--json`` prints the shares as one
JSON object: ``image_sequential``, ``image_overlapped`` (PNG), ``image_webp_sequential``,
``image_webp_overlapped``, ``video_sequential``, ``video_overlapped``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

# localfleet (the launchers) is not installed with the project: it is imported from this checkout.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sleep_adapter import SLEEP_ADAPTER
from localfleet.process import WorkerProcess
from producer.client import Client
from routing.io.connection import connect
from routing.jobs.codecs import encode_label
from routing.jobs.keys import Keys
from routing.settings import Settings

IMAGE = {"model": "z-image-turbo", "width": 1024, "height": 1024, "steps": 4}
VIDEO = {
    "model": "wan2.2-ti2v-5b",
    "kind": "text-to-video",
    "width": 1280,
    "height": 704,
    "frames": 121,
    "steps": 10,
}


def busy_share(redis_url: str, scratch: Path, request: dict, hold_s: float, jobs: int, pending: int) -> dict:
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"bench-busy-{uuid.uuid4().hex[:8]}",
        storage_dir=scratch / f"objects-{uuid.uuid4().hex[:6]}",
        worker_class="gpu80",
        adapters={"z-image-turbo": SLEEP_ADAPTER, "wan2.2-ti2v-5b": SLEEP_ADAPTER},
        warm_models=[request["model"]],
        max_pending_outputs=pending,
    )
    log = scratch / f"worker-{settings.key_prefix}.log"
    with WorkerProcess(settings, log) as worker, Client(settings) as client:
        worker.wait_ready()
        deadline = time.monotonic() + 300
        while f"loaded {request['model']}" not in worker.log():
            if time.monotonic() > deadline:
                raise TimeoutError(worker.log())
            time.sleep(0.2)
        handles = client.submit_many([request | {"prompt": f"hold={hold_s} #{i}"} for i in range(jobs)])
        records = [h.wait(timeout_s=60 + jobs * hold_s * 5) for h in handles]
        bad = [r.error for r in records if r.status.value != "succeeded"]
        assert not bad, bad
        time.sleep(1)  # the last job's seconds are added just after its record is written
        raw = connect(settings)
        gpu_busy = Keys(settings.key_prefix).metrics("gpu_busy")
        totals = {k.decode(): float(v) for k, v in raw.hgetall(gpu_busy).items()}
        for key in raw.scan_iter(f"{settings.key_prefix}:*"):
            raw.delete(key)
    first = min(r.started_at for r in records)
    last = max(r.finished_at for r in records)
    return {
        "share": round(totals[encode_label("gpu80", "busy_s")] / totals[encode_label("gpu80", "work_s")], 4),
        "jobs": jobs,
        "wall_s": round(last - first, 1),
        "encode_s": round(sum(r.timings["encode_s"] for r in records) / jobs, 2),
        "store_s": round(sum(r.timings["store_s"] for r in records) / jobs, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-jobs", type=int, default=12)
    parser.add_argument("--video-jobs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the shares as one JSON object")
    parser.add_argument(
        "--redis-url", default=os.environ.get("FLEET_BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    )
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for kind, request, hold_s, jobs in (
            ("image", IMAGE, 1.0, args.image_jobs),
            ("image_webp", IMAGE | {"output_format": "webp"}, 1.0, args.image_jobs),
            ("video", VIDEO, 10.0, args.video_jobs),
        ):
            for way, pending in (("sequential", 0), ("overlapped", 1)):
                results[f"{kind}_{way}"] = busy_share(args.redis_url, scratch, request, hold_s, jobs, pending)
                if not args.json:
                    r = results[f"{kind}_{way}"]
                    print(
                        f"{kind} T={hold_s:g}s {way:<10}  busy {r['share']:.3f}  ({r['jobs']} jobs in "
                        f"{r['wall_s']} s; encode {r['encode_s']} s, store {r['store_s']} s a job)",
                        flush=True,
                    )
    if args.json:
        print(json.dumps({name: r["share"] for name, r in results.items()}))
        return
    for kind, goal in (("image", 0.97), ("image_webp", 0.97), ("video", 0.98)):
        seq, over = results[f"{kind}_sequential"]["share"], results[f"{kind}_overlapped"]["share"]
        verdict = "met" if over >= goal else "NOT met"
        print(f"{kind}: overlapped / sequential {over / seq:.2f}; goal >= {goal}: {verdict}")


if __name__ == "__main__":
    main()

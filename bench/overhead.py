"""What the fleet adds to a job: N small jobs through the whole path vs the same pipeline in-process.

    python bench/overhead.py [--jobs 50]

Whole path: SDK submit -> Redis -> Celery worker process (model resident) -> ZImagePipeline ->
PNG -> object store -> job record -> the SDK's wait() returns. Baseline: the same
``ZImagePipeline.from_pretrained`` weights called in this process with the same request. Added
latency per job is its end-to-end time minus its own pipeline call as the worker timed it.
Uses Redis database 1 under its own key prefix and a temporary object store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

# localfleet (the launchers) is not installed with the project: it is imported from this checkout.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localfleet.process import WorkerProcess
from producer.client import Client
from routing.io.connection import connect
from routing.settings import Settings
from testkit.small_models import build

REQUEST = {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 1}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def in_process(models: Path, n: int) -> list[float]:
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = diffusers.ZImagePipeline.from_pretrained(models / "z-image-turbo", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(n + 3):
        started = time.perf_counter()
        pipe(
            prompt=REQUEST["prompt"],
            width=REQUEST["width"],
            height=REQUEST["height"],
            num_inference_steps=REQUEST["steps"],
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(REQUEST["seed"]),
        )
        if i >= 3:  # the first calls warm caches
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument(
        "--redis-url", default=os.environ.get("FLEET_BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    )
    args = parser.parse_args()
    models = ROOT / "var" / "small-models"
    build(models, ["z-image-turbo"])

    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(
            redis_url=args.redis_url,
            key_prefix=f"bench-{uuid.uuid4().hex[:8]}",
            storage_dir=Path(scratch) / "objects",
            model_root=models,
            warm_models=["z-image-turbo"],
        )
        end_to_end, added, worker_inference = [], [], []
        with WorkerProcess(settings, Path(scratch) / "worker.log").wait_ready(), Client(settings) as client:
            for i in range(args.jobs + 3):
                started = time.perf_counter()
                record = client.submit(REQUEST).wait(timeout_s=60)
                elapsed = time.perf_counter() - started
                assert record.status.value == "succeeded", record.error
                if i >= 3:
                    end_to_end.append(elapsed)
                    worker_inference.append(record.timings["inference_s"])
                    added.append(elapsed - record.timings["inference_s"])
            raw = connect(settings)
            for key in raw.scan_iter(f"{settings.key_prefix}:*"):
                raw.delete(key)
        baseline = in_process(models, args.jobs)

    ms = 1000
    p50_e2e, p50_base = statistics.median(end_to_end), statistics.median(baseline)
    print(
        f"{args.jobs} jobs, z-image-turbo small model, {REQUEST['width']}x{REQUEST['height']}, {REQUEST['steps']} steps"
    )
    print(
        f"in-process pipeline call     p50 {p50_base * ms:7.1f} ms   p95 {percentile(baseline, 0.95) * ms:7.1f} ms"
    )
    print(f"pipeline call in the worker  p50 {statistics.median(worker_inference) * ms:7.1f} ms")
    print(
        f"through the fleet            p50 {p50_e2e * ms:7.1f} ms   p95 {percentile(end_to_end, 0.95) * ms:7.1f} ms"
    )
    print(
        f"added by the fleet           p50 {statistics.median(added) * ms:7.1f} ms   p95 {percentile(added, 0.95) * ms:7.1f} ms"
    )
    print(f"ratio fleet / in-process (p50)   {p50_e2e / p50_base:.2f}")
    goal = statistics.median(added) * ms <= 15
    print(f"goal added p50 <= 15 ms: {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()

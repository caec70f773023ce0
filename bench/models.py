"""Per-model job time on the small models (CPU, random weights: the figures say how the fleet's
own overhead compares between models, nothing about the real models' speed or quality), the
share spent outside the pipeline call, and what switching between resident models costs against
loading an evicted one.

    python bench/models.py [--jobs 5]

One gpu80 worker (it consumes gpu80 and gpu16, so it runs every model here). For each model: the
first job (cold: it loads the model), then N warm jobs; per job the fleet's own timings split
the time into the pipeline call and everything else (queue, inputs, encode, store, bookkeeping).
Animate from a photo and a video: preprocessing's share of the job, each job on a video not seen
before, then on one seen (its results found in the worker's cache). Then, with a budget that holds two models, it alternates between two resident models (no load
expected) and brings back an evicted one (a load, timed). Redis database 1, its own prefix.
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

from PIL import Image

# localfleet (the launchers) is not installed with the project: it is imported from this checkout.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localfleet.process import WorkerProcess
from producer.client import Client
from routing.io.connection import connect
from routing.settings import Settings
from testkit.small_models import build
from worker.media import encode_mp4, encode_png


def picture() -> bytes:
    return encode_png(Image.new("RGB", (64, 64), (120, 80, 200)))


def clip(shade: int = 0) -> bytes:
    return encode_mp4([Image.new("RGB", (64, 64), (10 * i + shade, 50, 90)) for i in range(9)], 30)


def requests(client: Client) -> dict[str, dict]:
    image = client.upload(picture())
    video = client.upload(clip())
    small = {"width": 64, "height": 64, "steps": 2}
    return {
        "z-image-turbo": {"model": "z-image-turbo", "prompt": "a fox"} | small,
        # Guidance (the base's default 4.0) runs each step on a batch of two.
        "z-image": {"model": "z-image", "prompt": "a fox", "negative_prompt": "blurry"} | small,
        "z-image-omni-base": {"model": "z-image-omni-base", "kind": "text-to-image", "prompt": "a fox"}
        | small,
        # Same model as the row above, so its "cold" job loads nothing.
        "z-image-omni-base edit": {
            "model": "z-image-omni-base",
            "kind": "edit",
            "prompt": "a hat",
            "images": [image, image],
        }
        | small,
        "qwen-image": {"model": "qwen-image", "prompt": "a fox"} | small,
        "qwen-image-edit": {"model": "qwen-image-edit", "prompt": "a hat", "images": [image]} | small,
        "qwen-image-edit-2509": {"model": "qwen-image-edit-2509", "prompt": "a hat", "images": [image, image]}
        | small,
        "wan2.2-ti2v-5b": {"model": "wan2.2-ti2v-5b", "kind": "text-to-video", "prompt": "waves", "frames": 9}
        | small,
        # Two experts: 2 steps at shift 5 run one on each (timesteps 999 and 833).
        "wan2.2-t2v-a14b": {"model": "wan2.2-t2v-a14b", "prompt": "waves", "frames": 9} | small,
        "wan2.2-i2v-a14b": {"model": "wan2.2-i2v-a14b", "prompt": "waves", "image": image, "frames": 9}
        | small,
        "wan2.2-animate-14b": {
            "model": "wan2.2-animate-14b",
            "mode": "move",
            "prompt": "dance",
            "image": image,
            "pose_video": video,
            "face_video": video,
            "frames": 9,
        }
        | small,
    }


def animate_from_video(client: Client, jobs: int) -> None:
    """Preprocessing's share of an animate job made from a photo and a video (move mode)."""
    request = {
        "model": "wan2.2-animate-14b",
        "mode": "move",
        "prompt": "dance",
        "image": client.upload(picture()),
        "width": 64,
        "height": 64,
        "steps": 2,
    }
    # The first job loads the preprocessing models; each job after it has a video of its own.
    run(client, request | {"video": client.upload(clip(1))})
    fresh = [run(client, request | {"video": client.upload(clip(2 + i))})[1] for i in range(jobs)]
    seen = [run(client, request | {"video": client.upload(clip(2)), "seed": i})[1] for i in range(jobs)]
    for label, timings in (("a new video", fresh), ("the same video", seen)):
        preprocess = statistics.median(t["preprocess_s"] for t in timings)
        whole = statistics.median(t["run_s"] for t in timings)
        found = sum(t["preprocess_cached"] == 1.0 for t in timings)
        print(
            f"animate move from a photo and {label}: preprocessing p50 {preprocess:.3f} s of a "
            f"{whole:.3f} s job ({100 * preprocess / whole:.1f}%), {found}/{len(timings)} found in the cache"
        )


def run(client: Client, request: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    record = client.submit(request).wait(timeout_s=600)
    assert record.status.value == "succeeded", record.error
    return time.perf_counter() - started, record.timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument(
        "--redis-url", default=os.environ.get("FLEET_BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    )
    args = parser.parse_args()
    models_dir = ROOT / "var" / "small-models"
    build(models_dir)

    with tempfile.TemporaryDirectory() as scratch:
        base = Settings(
            redis_url=args.redis_url,
            key_prefix=f"bench-{uuid.uuid4().hex[:8]}",
            storage_dir=Path(scratch) / "objects",
            model_root=models_dir,
            worker_class="gpu80",
            preprocess_cache_dir=Path(scratch) / "preprocess-cache",
        )
        print(
            f"per-model job time, CPU, small random-weight models, 2 steps, 64x64 "
            f"({args.jobs} warm jobs each, one gpu80 worker)"
        )
        print(f"{'model':<24} {'cold s':>7} {'warm p50 s':>10} {'pipeline s':>10} {'outside %':>9}")
        with WorkerProcess(base, Path(scratch) / "w1.log").wait_ready(), Client(base) as client:
            for model, request in requests(client).items():
                cold, _ = run(client, request)
                warm = [run(client, request | {"seed": i}) for i in range(args.jobs)]
                total = statistics.median(t for t, _ in warm)
                pipeline = statistics.median(timings["inference_s"] for _, timings in warm)
                print(
                    f"{model:<24} {cold:7.2f} {total:10.3f} {pipeline:10.3f} {100 * (total - pipeline) / total:8.1f}%"
                )
            animate_from_video(client, args.jobs)

        # Budget for two: z-image (19.1 GiB of predicted weights) and qwen-image (53.7) stay with
        # room for a small job beside them; qwen-image-edit (53.7) evicts.
        switch = base.model_copy(update={"vram_budget_gb": 76, "key_prefix": base.key_prefix + "-switch"})
        with WorkerProcess(switch, Path(scratch) / "w2.log").wait_ready(), Client(switch) as client:
            reqs = requests(client)
            run(client, reqs["z-image-turbo"])
            run(client, reqs["qwen-image"])
            switches = [run(client, reqs[m])[1] for m in ["z-image-turbo", "qwen-image"] * 3]
            loads_when_switching = sum("load_s" in t for t in switches)
            run(client, reqs["qwen-image-edit"])  # evicts the least recently used (z-image)
            _, back = run(client, reqs["z-image-turbo"])  # an evicted model comes back
        print()
        print(f"switching between two resident models, 6 jobs: {loads_when_switching} loads")
        print(
            f"bringing back an evicted model: load {back.get('load_s', 0.0):.2f} s of a {back['run_s']:.2f} s job"
        )
        raw = connect(base)
        for key in raw.scan_iter(f"{base.key_prefix}*"):
            raw.delete(key)


if __name__ == "__main__":
    main()

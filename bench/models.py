"""Per-model job time on the small models, the share spent outside the pipeline call, and what
switching between resident models costs against loading an evicted one.

    python bench/models.py [--jobs 5]

One gpu80 worker (it consumes gpu80 and gpu16, so it runs every model here). For each model: the
first job (cold: it loads the model), then N warm jobs; per job the fleet's own timings split
the time into the pipeline call and everything else (queue, inputs, encode, store, bookkeeping).
Then, with a budget that holds two models, it alternates between two resident models (no load
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


def clip() -> bytes:
    return encode_mp4([Image.new("RGB", (64, 64), (10 * i, 50, 90)) for i in range(9)], 30)


def requests(client: Client) -> dict[str, dict]:
    image = client.upload(picture())
    video = client.upload(clip())
    small = {"width": 64, "height": 64, "steps": 2}
    return {
        "z-image-turbo": {"model": "z-image-turbo", "prompt": "a fox"} | small,
        "qwen-image": {"model": "qwen-image", "prompt": "a fox"} | small,
        "qwen-image-edit": {"model": "qwen-image-edit", "prompt": "a hat", "images": [image]} | small,
        "qwen-image-edit-2509": {"model": "qwen-image-edit-2509", "prompt": "a hat", "images": [image, image]}
        | small,
        "wan2.2-ti2v-5b": {"model": "wan2.2-ti2v-5b", "kind": "text-to-video", "prompt": "waves", "frames": 9}
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
        )
        print(
            f"per-model job time, small models, 2 steps, 64x64 ({args.jobs} warm jobs each, one gpu80 worker)"
        )
        print(f"{'model':<22} {'cold s':>7} {'warm p50 s':>10} {'pipeline s':>10} {'outside %':>9}")
        with WorkerProcess(base, Path(scratch) / "w1.log").wait_ready(), Client(base) as client:
            for model, request in requests(client).items():
                cold, _ = run(client, request)
                warm = [run(client, request | {"seed": i}) for i in range(args.jobs)]
                total = statistics.median(t for t, _ in warm)
                pipeline = statistics.median(timings["inference_s"] for _, timings in warm)
                print(
                    f"{model:<22} {cold:7.2f} {total:10.3f} {pipeline:10.3f} {100 * (total - pipeline) / total:8.1f}%"
                )

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

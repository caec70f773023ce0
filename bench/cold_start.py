"""Cold start from the object store: filling an empty node cache against a plain boto3 download,
and the time to a worker's first job from an empty node cache.

    python bench/cold_start.py [--models z-image-turbo qwen-image] [--synthetic-mb 512] [--repeats 3]

Everything runs on this machine: an S3-protocol server (moto) on loopback, the small
random-weight models (``testkit.small_models``), Redis (``--redis-url``) and one worker process
on the CPU. Per model:

1. the files of its mirror fetched into an empty folder by a plain boto3 download (one
   ``get_object`` a file, read whole, one file after another) and by the node-cache fill
   (``worker.weights.fill``: ranged reads in parallel, each file hashed against the manifest and
   renamed into place), median of ``--repeats``, as a ratio;
2. ``--synthetic-mb``: the same on files of random bytes of that total size, where transfer
   rather than per-request cost decides;
3. the time from starting a worker with an empty node cache to its first job's end, against the
   same worker loading the same files from a local folder, with the first job's load split as
   the worker reports it (``load_read_s``: filling and reading the weights, building the
   pipeline; ``load_to_device_s``: moving it to the device, here the CPU).

Small-model and CPU figures: they show the mechanism's overhead and the ratio on loopback, not
what a real model does from S3 on a GPU node. The moto server answers a ranged GET by reading
the whole object and slicing it, so every range costs a whole file here; S3 and MinIO serve the
range alone, which is what parallel ranges are for.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

# localfleet (the launchers) is not installed with the project: it is imported from this checkout.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydantic import SecretStr

from localfleet.process import WorkerProcess
from producer.client import Client
from routing.catalog import ModelSpec, get_model
from routing.io.connection import connect
from routing.io.storage import S3Storage
from routing.settings import Settings
from testkit.small_models import build
from worker.weights.files import Manifest, file_key, sha256_of
from worker.weights.fill import fill
from worker.weights.mirror import mirror

REQUEST = {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 1}
# The settings' defaults: what a worker does unless told otherwise.
CHUNK_BYTES = Settings.model_fields["weights_fill_chunk_bytes"].default
THREADS = Settings.model_fields["weights_fill_threads"].default


def start_s3_server(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            opener.open(endpoint, timeout=1).close()
            return proc, endpoint
        except urllib.error.HTTPError:
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the S3 server did not start")


def plain_boto3(storage: S3Storage, spec: ModelSpec, manifest: Manifest, out: Path) -> None:
    for entry in manifest.files:
        path = out / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        body = storage.client.get_object(Bucket=storage.bucket, Key=file_key(spec, manifest, entry.path))[
            "Body"
        ]
        path.write_bytes(body.read())


def median_s(run: Callable[[Path], object], scratch: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(dir=scratch))
        started = time.perf_counter()
        run(out)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compare_downloads(storage: S3Storage, spec: ModelSpec, folder: Path, scratch: Path, repeats: int) -> None:
    manifest = mirror(storage, spec, folder)
    plain = median_s(lambda out: plain_boto3(storage, spec, manifest, out), scratch, repeats)
    filled = median_s(
        lambda out: fill(storage, spec, out, chunk_bytes=CHUNK_BYTES, threads=THREADS), scratch, repeats
    )
    # What checking costs alone: hashing the same bytes once, which the plain download skips.
    started = time.perf_counter()
    for entry in manifest.files:
        sha256_of(folder / entry.path)
    hashing = time.perf_counter() - started
    print(
        f"{spec.key:<22} {len(manifest.files):>3} files {manifest.total_bytes / 1e6:9.1f} MB   "
        f"plain boto3 {plain:7.3f} s   fill {filled:7.3f} s (hashing alone {hashing:.3f} s)   "
        f"ratio fill / plain {filled / plain:5.2f}"
    )


def synthetic_folder(scratch: Path, total_mb: int) -> Path:
    folder = scratch / "synthetic"
    (folder / "transformer").mkdir(parents=True)
    per_file = total_mb * 1024 * 1024 // 4
    for i in range(4):
        with open(folder / "transformer" / f"shard-{i}.safetensors", "wb") as f:
            for _ in range(0, per_file, 1 << 20):
                f.write(os.urandom(1 << 20))
    return folder


def first_job_s(settings: Settings, log: Path) -> tuple[float, dict[str, float]]:
    """Seconds from starting a worker to its first job's end, and that job's timings."""
    started = time.perf_counter()
    with WorkerProcess(settings, log).wait_ready(), Client(settings) as client:
        record = client.submit(REQUEST).wait(timeout_s=300)
        elapsed = time.perf_counter() - started
        assert record.status.value == "succeeded", record.error
        raw = connect(settings)
        for key in raw.scan_iter(f"{settings.key_prefix}:*"):
            raw.delete(key)
    return elapsed, record.timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["z-image-turbo", "qwen-image", "wan2.2-ti2v-5b"])
    parser.add_argument("--synthetic-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--redis-url", default=os.environ.get("FLEET_BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    )
    args = parser.parse_args()
    models = ROOT / "var" / "small-models"
    build(models, sorted(set(args.models) | {REQUEST["model"]}))

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        server, endpoint = start_s3_server(scratch / "s3.log")
        try:
            storage = S3Storage(
                f"bench-{uuid.uuid4().hex[:8]}", endpoint, access_key_id="x", secret_access_key="x"
            )
            storage.ensure_bucket()
            print(f"S3-protocol server on loopback; fill: {CHUNK_BYTES >> 20} MiB ranges, {THREADS} threads")
            print("small random-weight models (CPU machine, loopback: not a GPU node's figures):")
            for key in args.models:
                compare_downloads(storage, get_model(key), models / key, scratch, args.repeats)
            if args.synthetic_mb:
                spec = dataclasses.replace(get_model(REQUEST["model"]), revision="bench-synthetic")
                print(f"synthetic: {args.synthetic_mb} MB of random bytes in 4 files")
                compare_downloads(
                    storage, spec, synthetic_folder(scratch, args.synthetic_mb), scratch, args.repeats
                )

            base = Settings(
                redis_url=args.redis_url,
                key_prefix=f"bench-{uuid.uuid4().hex[:8]}",
                storage_backend="s3",
                s3_endpoint_url=endpoint,
                s3_bucket=storage.bucket,
                s3_access_key_id=SecretStr("x"),
                s3_secret_access_key=SecretStr("x"),
                weights_fill_chunk_bytes=CHUNK_BYTES,
                weights_fill_threads=THREADS,
            )
            mirror(storage, get_model(REQUEST["model"]), models / REQUEST["model"])
            local_s, local = first_job_s(
                base.model_copy(update={"model_root": models}), scratch / "local.log"
            )
            cold_s, cold = first_job_s(
                base.model_copy(update={"weights_cache_dir": scratch / "node-cache"}), scratch / "cold.log"
            )
        finally:
            server.terminate()
            server.wait()

    print(
        f"worker start to first job's end, {REQUEST['model']} small, {REQUEST['width']}x{REQUEST['height']}:"
    )
    for name, seconds, timings in (("local folder", local_s, local), ("empty node cache", cold_s, cold)):
        print(
            f"  {name:<17} {seconds:6.2f} s   load {timings['load_s']:.3f} s = read "
            f"{timings['load_read_s']:.3f} s + to device {timings['load_to_device_s']:.3f} s"
        )
    print(f"  ratio empty cache / local folder {cold_s / local_s:.2f}")


if __name__ == "__main__":
    main()

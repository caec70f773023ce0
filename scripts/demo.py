"""The demo: one text-to-image job through the whole fleet on this machine.

Local Redis, a 16GB-class worker on small random-weight Z-Image models, the CLI submitting and
following the job, the output in a local object-store directory. Stops what it started.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from producer.client import Client
from routing.settings import Settings
from worker.process import WorkerProcess, settings_env
from worker.small_models import build

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"


def main() -> int:
    started = time.monotonic()
    print("== small models (random weights, the real diffusers/transformers classes)")
    models = VAR / "small-models"
    build(models, ["z-image-turbo"])

    settings = Settings(
        storage_dir=VAR / "objects",
        model_root=models,
        warm_models=["z-image-turbo"],
    )
    print(f"== starting a {settings.worker_class} worker (log: {VAR / 'demo' / 'worker.log'})")
    with WorkerProcess(settings, VAR / "demo" / "worker.log").wait_ready():
        print("== submitting through the CLI")
        command = [
            sys.executable, "-m", "producer", "submit", "z-image-turbo",
            "--prompt", "a lighthouse on a cliff at dusk, oil painting",
            "--width", "512", "--height", "384", "--steps", "9", "--seed", "42", "--wait", "--timeout", "120",
        ]  # fmt: skip
        print(
            "$ python -m producer submit z-image-turbo --prompt '...' --width 512 --height 384 --steps 9 --wait"
        )
        done = subprocess.run(
            command, cwd=ROOT, env=settings_env(settings), stdout=subprocess.PIPE, text=True
        )
        print(done.stdout, end="")
        if done.returncode != 0:
            print("the job did not succeed", file=sys.stderr)
            return done.returncode
        job_id = done.stdout.splitlines()[0].strip()

        with Client(settings) as client:
            record = client.status(job_id)
        output = record.outputs[0]
        path = settings.storage_dir / output.key
        with Image.open(path) as image:
            size = image.size
        print("== result")
        print(f"job        {record.id}")
        print(
            f"status     {record.status.value} (attempt {record.attempt}, steps {record.step}/{record.total_steps})"
        )
        print(f"worker     {record.worker}")
        print("timings    " + ", ".join(f"{k} {v:.3f}" for k, v in record.timings.items()))
        print(f"output     {path}")
        print(
            f"pixels     {size[0]}x{size[1]} ({output.content_type}, {output.size_bytes} bytes, seed {output.seed})"
        )
    print(f"== worker stopped; demo took {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

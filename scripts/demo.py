"""The demo: one job of every task kind through the whole fleet on this machine.

Local Redis, a 16GB-class and an 80GB-class worker and an 8xH100-class worker whose resident
torchrun group is two CPU ranks over gloo (Wan2.2-S2V and the official code's T2V-A14B and
I2V-A14B sharded over them with FSDP and Ulysses, as on eight GPUs), all on small random-weight
models, jobs submitted through the SDK (the first one through the CLI, with its progress bar), outputs in a local
object-store directory, and a gallery page showing every image and playing every video beside
its request. Stops what it started.
"""

from __future__ import annotations

import html
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# localfleet (the launchers) and testkit (the small models) are not installed with the project:
# they are imported from this checkout.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localfleet.flower import FlowerProcess
from localfleet.process import WorkerProcess, settings_env
from producer.client import Client
from routing.catalog import CATALOG, checkpoint_spec
from routing.jobs.record import JobRecord
from routing.settings import Settings
from testkit.s2v import A14B_GROUP_MODEL
from testkit.s2v import GROUP_MODEL as S2V_GROUP_MODEL
from testkit.small_models import build
from worker.media import encode_mp4, encode_png, encode_wav

VAR = ROOT / "var"
SERVED = [key for key, spec in CATALOG.items() if spec.served]
# The official checkpoints the group reads where another class reads the diffusers weights.
OFFICIAL = [checkpoint_spec(CATALOG[key]).key for key in SERVED if CATALOG[key].official]
# A client that plans with this margin sees 20 GiB of an 80 GB card: less than one A14B expert
# (26.9 GiB predicted) but more than a rank of the group needs (16.2 GiB), so it routes the small
# A14B jobs below to the 8xH100 class, as a 720p clip past 177 frames is (a CPU cannot make one).
GROUP_ROUTING_MARGIN_GIB = 60.0


def picture(size: tuple[int, int], hue: int, label: str) -> Image.Image:
    """A simple test picture: input media for the edit and video jobs."""
    image = Image.new("RGB", size, (hue, 120, 255 - hue))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 4, h // 6, 3 * w // 4, 5 * h // 6), fill=(240, 200, 160))
    draw.text((4, 4), label, fill=(0, 0, 0))
    return image


def clip(size: tuple[int, int], frames: int, fps: int, kind: str) -> bytes:
    """A short synthetic video: a figure crossing a lit room (``dance``, what a caller films), or
    one standing in for what Wan's preprocessing makes from it (pose skeleton, face crop,
    background, person mask)."""
    w, h = size
    images = []
    for i in range(frames):
        image = Image.new("RGB", size, (0, 0, 0) if kind in ("pose", "mask") else (90, 140, 90))
        draw = ImageDraw.Draw(image)
        x = w // 4 + (w // 2) * i // max(frames - 1, 1)
        if kind == "pose":
            draw.line((x, h // 5, x, 3 * h // 5), fill=(255, 0, 0), width=3)
            draw.line((x - w // 8, 2 * h // 5, x + w // 8, 2 * h // 5), fill=(0, 255, 0), width=3)
        elif kind == "mask":
            draw.rectangle((x - w // 6, h // 6, x + w // 6, 5 * h // 6), fill=(255, 255, 255))
        elif kind == "dance":
            draw.ellipse((x - w // 10, h // 8, x + w // 10, h // 3), fill=(240, 200, 160))
            draw.rectangle((x - w // 8, h // 3, x + w // 8, 7 * h // 8), fill=(60, 60, 200))
        elif kind == "face":
            draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(240, 200, 160 + i % 40))
        images.append(image)
    return encode_mp4(images, fps)


def speech(seconds: float, rate: int = 16000) -> bytes:
    """A WAV of a voice-like tone: a 180 Hz carrier opening and closing three times a second."""
    t = np.arange(int(seconds * rate)) / rate
    return encode_wav(np.sin(2 * np.pi * 180 * t) * np.abs(np.sin(2 * np.pi * 3 * t)) * 0.37, rate)


def jobs(client: Client) -> list[dict]:
    """One request per task kind, small sizes (the models are small; the path is the real one)."""
    person = client.upload(encode_png(picture((64, 64), 40, "person")))
    other = client.upload(encode_png(picture((64, 64), 200, "friend")))
    scene = client.upload(encode_png(picture((96, 64), 120, "scene")))
    anim = CATALOG["wan2.2-animate-14b"].video
    videos = {
        kind: client.upload(clip((64, 64), 9, anim.fps, kind))
        for kind in ("pose", "face", "bg", "mask", "dance")
    }
    return [
        {
            "model": "z-image",
            "prompt": "a red fox in the snow",
            "negative_prompt": "blurry, low quality",
            "guidance_scale": 4.0,
            "cfg_truncation": 0.9,
            "width": 64,
            "height": 64,
            "steps": 2,
        },
        {
            "model": "z-image-omni-base",
            "kind": "text-to-image",
            "prompt": "a red fox in the snow",
            "width": 64,
            "height": 64,
            "steps": 2,
        },
        {
            "model": "z-image-omni-base",
            "kind": "edit",
            "prompt": "the person stands in the scene",
            "images": [person, scene],
            "steps": 2,
        },
        {"model": "qwen-image", "prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2},
        {"model": "qwen-image-edit", "prompt": "make the person wear a hat", "images": [person], "steps": 2},
        {
            "model": "qwen-image-edit-2509",
            "prompt": "the two people shake hands in the scene",
            "images": [person, other, scene],
            "steps": 2,
        },
        {
            "model": "wan2.2-ti2v-5b",
            "kind": "text-to-video",
            "prompt": "waves on a beach",
            "width": 64,
            "height": 64,
            "frames": 9,
            "steps": 2,
        },
        {
            "model": "wan2.2-ti2v-5b",
            "kind": "image-to-video",
            "prompt": "the person waves",
            "image": person,
            "width": 64,
            "height": 64,
            "frames": 9,
            "steps": 2,
        },
        *a14b_jobs(person, width=64, steps=4),
        {
            "model": "wan2.2-animate-14b",
            "mode": "move",
            "prompt": "a person dancing",
            "image": person,
            "pose_video": videos["pose"],
            "face_video": videos["face"],
            "width": 64,
            "height": 64,
            "frames": 9,
            "steps": 2,
        },
        {
            "model": "wan2.2-animate-14b",
            "mode": "mix",
            "prompt": "a person dancing",
            "image": person,
            "pose_video": videos["pose"],
            "face_video": videos["face"],
            "background_video": videos["bg"],
            "mask_video": videos["mask"],
            "width": 64,
            "height": 64,
            "frames": 9,
            "steps": 2,
        },
        # From only a photo and a video: the worker runs Wan-Animate's preprocessing on them.
        *(
            {
                "model": "wan2.2-animate-14b",
                "mode": mode,
                "prompt": "a person dancing",
                "image": person,
                "video": videos["dance"],
                "width": 64,
                "height": 64,
                "steps": 2,
            }
            for mode in ("move", "mix")
        ),
        {
            # The small S2V checkpoint renders the 832*480 size within 128*64 pixels.
            "model": "wan2.2-s2v-14b",
            "prompt": "a person talks to the camera",
            "image": scene,
            "audio": client.upload(speech(2.0)),
            "width": 832,
            "height": 480,
            "steps": 2,
        },
    ]


def group_jobs(client: Client) -> list[dict]:
    """One A14B job of each kind for the 8xH100 class's group (the official code)."""
    person = client.upload(encode_png(picture((64, 64), 200, "person")))
    return a14b_jobs(person, width=96)


def a14b_jobs(person: str, width: int, steps: int | None = None) -> list[dict]:
    """One job of each Wan2.2-A14B model: text to video at ``width``, image to video from
    ``person`` (64x64); ``steps`` None: the catalog's default."""
    common = {"height": 64, "frames": 9} | ({"steps": steps} if steps else {})
    return [
        {"model": "wan2.2-t2v-a14b", "prompt": "waves on a beach", "width": width, **common},
        {"model": "wan2.2-i2v-a14b", "prompt": "the person waves", "image": person, "width": 64, **common},
    ]


def cli_job(settings: Settings) -> str:
    """The text-to-image job, through the CLI so its progress bar shows."""
    command = [
        sys.executable, "-m", "producer", "submit", "z-image-turbo",
        "--prompt", "a lighthouse on a cliff at dusk, oil painting",
        "--width", "512", "--height", "384", "--steps", "8", "--seed", "42", "--wait", "--timeout", "300",
    ]  # fmt: skip
    print(
        "$ python -m producer submit z-image-turbo --prompt '...' --width 512 --height 384 --steps 8 --wait"
    )
    done = subprocess.run(command, cwd=ROOT, env=settings_env(settings), stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        raise SystemExit("the text-to-image job did not succeed")
    return done.stdout.splitlines()[0].strip()


def gallery(records: list[JobRecord], settings: Settings, page: Path) -> None:
    cells = []
    for record in records:
        media = []
        for output in record.outputs:
            src = os.path.relpath(settings.storage_dir / output.key, page.parent)
            if output.content_type.startswith("video/"):
                media.append(f'<video src="{src}" controls loop autoplay muted width="256"></video>')
            else:
                media.append(f'<img src="{src}" width="256">')
        request = html.escape(json.dumps(record.request, indent=1))
        status = record.status.value + (f": {html.escape(record.error.message)}" if record.error else "")
        cells.append(
            f"<section><h2>{record.model} &middot; {record.kind}</h2>{''.join(media)}"
            f"<p>{status}</p><pre>{request}</pre></section>"
        )
    page.write_text(
        "<!doctype html><meta charset=utf-8><title>fleet demo</title>"
        "<style>body{font-family:sans-serif;display:flex;flex-wrap:wrap;gap:1em}"
        "section{width:300px}img,video{image-rendering:pixelated;background:#222}"
        "pre{font-size:10px;white-space:pre-wrap}</style>" + "".join(cells)
    )


def main() -> int:
    started = time.monotonic()
    print("== small models (random weights, the real diffusers/transformers classes)")
    models = VAR / "small-models"
    build(models, SERVED + OFFICIAL)

    settings = Settings(storage_dir=VAR / "objects", model_root=models)
    gpu16 = settings.model_copy(update={"worker_class": "gpu16", "warm_models": ["z-image-turbo"]})
    gpu80 = settings.model_copy(update={"worker_class": "gpu80"})
    # The group starts with the worker's first group job; on this machine, two CPU ranks. S2V's
    # and A14B's ranks run the small checkpoints on the CPU (testkit.s2v).
    h100x8 = settings.model_copy(
        update={
            "worker_class": "h100x8",
            "group_world_size": 2,
            "group_log_dir": VAR / "demo" / "group",
            "group_adapters": {
                "wan2.2-s2v-14b": S2V_GROUP_MODEL,
                "wan2.2-t2v-a14b": A14B_GROUP_MODEL,
                "wan2.2-i2v-a14b": A14B_GROUP_MODEL,
            },
        }
    )
    password = secrets.token_urlsafe(12)
    port = int(os.environ.get("FLOWER_PORT", "5555"))
    print(f"== starting Flower, a gpu16, a gpu80 and an h100x8 worker (logs in {VAR / 'demo'})")
    with (
        FlowerProcess(settings, VAR / "demo" / "flower.log", port, password).wait_ready() as flower,
        WorkerProcess(gpu16, VAR / "demo" / "worker-gpu16.log").wait_ready(),
        WorkerProcess(gpu80, VAR / "demo" / "worker-gpu80.log").wait_ready(),
        WorkerProcess(h100x8, VAR / "demo" / "worker-h100x8.log").wait_ready(),
        Client(settings) as client,
        Client(settings.model_copy(update={"vram_margin_gib": GROUP_ROUTING_MARGIN_GIB})) as to_group,
    ):
        print(f"   Flower: {flower.url}  user {flower.auth[0]}  password {password}")
        print("== text-to-image through the CLI")
        first = cli_job(settings)
        print("== one job of every other task kind through the SDK")
        submitted = [client.submit(request) for request in jobs(client)]
        print("== T2V-A14B and I2V-A14B routed to the 8xH100 class: the official code in the group")
        submitted += [to_group.submit(request) for request in group_jobs(to_group)]
        records = [client.get(first)]
        for job in submitted:
            record = job.wait(timeout_s=600)
            records.append(record)
            output = record.outputs[0] if record.outputs else None
            shape = ""
            if output is not None:
                shape = f"{output.width}x{output.height}"
                shape += f", {output.frames} frames at {output.fps} fps" if output.frames else ""
            print(
                f"   {record.model:<22} {record.kind:<16} {record.status.value:<9} {shape:<28} {record.worker}"
            )
        if sys.stdin.isatty():
            input(f"== Flower shows the workers and tasks at {flower.url}; press Enter to stop everything ")

    page = VAR / "demo" / "gallery.html"
    gallery(records, settings, page)
    first_output = records[0].outputs[0]
    print("== result")
    print(f"text-to-image  {records[0].status.value}, {settings.storage_dir / first_output.key}")
    print(f"               {first_output.width}x{first_output.height} {first_output.content_type}")
    failed = [r for r in records if r.status.value != "succeeded"]
    print(f"gallery        {page}")
    print(
        f"== workers stopped; {len(records) - len(failed)}/{len(records)} jobs succeeded in {time.monotonic() - started:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line for the fleet: the same commands and flags over Redis (the SDK ``producer.Client``)
or over the HTTP API (``--api URL --key KEY``, or FLEET_API_URL / FLEET_API_KEY: the SDK
``producer.http.Client``, for a machine with an API key and no Redis access).

python -m producer submit z-image-turbo --prompt "a red fox" --width 512 --height 512 --wait
python -m producer submit qwen-image-edit --prompt "add a hat" --image cat.png --wait --out out/
python -m producer submit wan2.2-ti2v-5b --kind image-to-video --prompt "it moves" --image first.png
python -m producer submit wan2.2-animate-14b --mode move --prompt "dance" --image me.png --video dance.mp4
python -m producer submit wan2.2-animate-14b --mode move --prompt "dance" --image me.png \\
    --pose-video pose.mp4 --face-video face.mp4
python -m producer submit wan2.2-s2v-14b --prompt "she sings" --image face.png --audio song.wav
python -m producer submit z-image-turbo --prompt "a red fox" --lora style.safetensors@0.8
python -m producer status JOB_ID
python -m producer wait JOB_ID --out out/
python -m producer cancel JOB_ID
python -m producer list
python -m producer usage --start 2026-12-01 --end 2026-12-06
python -m producer keys create --label "ci deploys"     (prints the new key, once)
python -m producer keys list
python -m producer keys revoke KEY_ID

Input media and LoRAs are a local file (uploaded first, through the transport's SDK) or an
http(s) URL (fetched and checked by the fleet at submit); a LoRA may also be a store key or a hub id.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import webbrowser
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from routing.catalog import CATALOG
from routing.errors import FieldError, FleetError, InvalidRequest
from routing.jobs.record import JobRecord, JobStatus
from routing.jobs.usage import Usage

_BAR_WIDTH = 30
_URL = re.compile(r"^https?://", re.IGNORECASE)
# Flags that name one input medium, and the request field each fills.
_MEDIA_FLAGS = {
    "audio": "audio",
    "video": "video",
    "pose_video": "pose_video",
    "face_video": "face_video",
    "background_video": "background_video",
    "mask_video": "mask_video",
}
_PLAIN_FIELDS = (
    "kind",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "cfg_normalization",
    "cfg_truncation",
    "guidance_scale_2",
    "seed",
    "num_outputs",
    "output_format",
    "output_quality",
    "frames",
    "mode",
    "retarget",
    "clips",
    "variant",
)

Upload = Callable[[Path], dict[str, str]]


class _Usage(Exception):
    """A command line the CLI cannot run (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m producer", description="Submit and follow fleet jobs.")
    parser.add_argument(
        "--api", default=os.environ.get("FLEET_API_URL"), help="the HTTP API's URL (FLEET_API_URL)"
    )
    parser.add_argument("--key", default=os.environ.get("FLEET_API_KEY"), help="API key (FLEET_API_KEY)")
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="queue a job")
    submit.add_argument("model", help="catalog key, e.g. z-image-turbo")
    submit.add_argument("--kind", help="task kind (default: the model's only kind)")
    submit.add_argument("--prompt", required=True)
    submit.add_argument("--negative-prompt")
    submit.add_argument("--width", type=int)
    submit.add_argument("--height", type=int)
    submit.add_argument("--steps", type=int)
    submit.add_argument("--guidance-scale", type=float)
    submit.add_argument(
        "--cfg-normalization",
        action=argparse.BooleanOptionalAction,
        help="z-image, z-image-omni-base: keep each guided step no longer than the prompt's own",
    )
    submit.add_argument(
        "--cfg-truncation",
        type=float,
        help="z-image, z-image-omni-base: stop guidance after this share (0-1)",
    )
    submit.add_argument(
        "--guidance-scale-2", type=float, help="two-expert models (A14B): the low-noise expert's guidance"
    )
    submit.add_argument("--seed", type=int)
    submit.add_argument(
        "--num-outputs", type=int, help="images from one text-to-image job (seeds seed, seed+1, ...)"
    )
    submit.add_argument("--format", dest="output_format", help="png, webp or jpeg for images; mp4 for videos")
    submit.add_argument("--quality", dest="output_quality", type=int, help="webp/jpeg quality, 1-100")
    submit.add_argument("--frames", type=int, help="video frames")
    submit.add_argument("--mode", choices=["move", "mix"], help="animate: move or mix")
    submit.add_argument(
        "--retarget",
        action="store_true",
        default=None,
        help="animate, move mode from --video: fit the pose to the character's proportions",
    )
    submit.add_argument("--clips", type=int, help="speech-to-video: at most this many clips")
    submit.add_argument("--variant", help="the model's variant (e.g. a distilled one)")
    media = submit.add_argument_group("input media: a local file (uploaded) or an http(s) URL")
    media.add_argument(
        "--image",
        action="append",
        default=[],
        help="edit: an image to edit (repeat to compose several); image-to-video: the first "
        "frame; animate: the character; speech-to-video: the face",
    )
    media.add_argument("--audio", help="speech-to-video: the speech or song")
    media.add_argument("--video", help="animate: the driving video (move) or the scene (mix)")
    media.add_argument("--pose-video", help="animate: the driving pose video; speech-to-video: optional pose")
    media.add_argument("--face-video", help="animate: the driving face video")
    media.add_argument("--background-video", help="animate, mix mode")
    media.add_argument("--mask-video", help="animate, mix mode")
    media.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="SOURCE[@SCALE]",
        help="a LoRA: local file, https URL, store key or hub id, with its scale (default 1); repeatable",
    )
    for expert in ("high", "low"):
        media.add_argument(
            f"--lora-{expert}",
            action="append",
            default=[],
            metavar="SOURCE[@SCALE]",
            help=f"two-expert models (A14B): a LoRA for the {expert}-noise expert only; repeatable",
        )
    submit.add_argument("--idempotency-key")
    submit.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    submit.add_argument("--tenant", default="", help="whose job it is (over --api, the key says)")
    _follow_flags(submit, "follow the job to its end")

    for name, text in (
        ("status", "print a job's record"),
        ("wait", "follow a job to its end"),
        ("cancel", "cancel a job"),
        ("delete", "delete an ended job now: its files, then its record"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id")
        if name == "wait":
            _follow_flags(command, None)
    listing = commands.add_parser("list", help="list jobs, newest first (--order asc: oldest)")
    listing.add_argument("--tenant", default="", help="whose jobs (over --api, the key says)")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--order", choices=["desc", "asc"], default="desc", help="asc: oldest first")
    usage = commands.add_parser("usage", help="what a tenant used: jobs, GPU-seconds, outputs, by UTC day")
    usage.add_argument("--tenant", default="", help="whose usage (over --api, the key says)")
    usage.add_argument("--start", type=_date, help="first UTC day, YYYY-MM-DD (default: end's month's first)")
    usage.add_argument("--end", type=_date, help="last UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    keys = commands.add_parser("keys", help="the API keys a tenant made: create, list, revoke")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("key_id", nargs="?", help="the key to revoke (its id, as list prints it)")
    keys.add_argument("--tenant", default="", help="whose keys (over --api, the key says)")
    keys.add_argument("--label", default="", help="what a new key is for")
    return parser


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _follow_flags(parser: argparse.ArgumentParser, wait_help: str | None) -> None:
    if wait_help is not None:
        parser.add_argument("--wait", action="store_true", help=wait_help)
    parser.add_argument("--timeout", type=float, help="seconds to wait")
    parser.add_argument("--out", type=Path, help="save the outputs into this folder")
    parser.add_argument("--open", action="store_true", help="open the outputs")


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _connect(args) as client:
            return _dispatch(client, args, out, err)
    except _Usage as exc:
        print(f"error: {exc}", file=err)
        return 2
    except InvalidRequest as exc:
        for error in exc.errors:
            print(f"error: {error.field}: {error.message}", file=err)
        return 2
    except FleetError as exc:
        print(f"error: {exc}", file=err)
        return 1


def _connect(args: argparse.Namespace) -> Any:
    """The SDK client of the transport the flags name; both have the same verbs."""
    if args.api:
        if not args.key:
            raise _Usage("--api needs an API key: --key or FLEET_API_KEY")
        from producer.http import Client as HttpClient

        return HttpClient(args.api, args.key)
    from producer.client import Client

    return Client()


def build_request(args: argparse.Namespace, upload: Upload) -> dict[str, Any]:
    """The request the ``submit`` flags say, local files uploaded with ``upload``: the same
    request whichever transport sends it."""
    request: dict[str, Any] = {"model": args.model, "prompt": args.prompt}
    for field in _PLAIN_FIELDS:
        value = getattr(args, field)
        if value is not None:
            request[field] = value
    if args.image:
        images = [_media("image", value, upload) for value in args.image]
        if _kind(args) == "edit":
            request["images"] = images
        elif len(images) > 1:
            raise InvalidRequest([FieldError("image", "one --image for this kind; several only for edit")])
        else:
            request["image"] = images[0]
    for flag, field in _MEDIA_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            request[field] = _media(field, value, upload)
    loras = [_lora(value, upload) for value in args.lora]
    for expert in ("high", "low"):
        loras += [_lora(value, upload) | {"expert": expert} for value in getattr(args, f"lora_{expert}")]
    if loras:
        request["loras"] = loras
    return request


def _kind(args: argparse.Namespace) -> str | None:
    if args.kind:
        return args.kind
    spec = CATALOG.get(args.model)
    if spec is None or len(spec.task_kinds) != 1:
        return None  # the fleet names what is missing
    return next(iter(spec.task_kinds)).value


def _media(field: str, value: str, upload: Upload) -> dict[str, str]:
    if _URL.match(value):
        return {"url": value}
    path = Path(value).expanduser()
    if not path.is_file():
        raise _Usage(f"--{field.replace('_', '-')}: no such file {value!r} (a local file or an http(s) URL)")
    return upload(path)


def _lora(value: str, upload: Upload) -> dict[str, Any]:
    source, at, scale_text = value.rpartition("@")
    scale = None
    if at:
        try:
            scale = float(scale_text)
        except ValueError:
            source = value  # an "@" of the source itself
    else:
        source = value
    if not _URL.match(source) and Path(source).expanduser().is_file():
        source = upload(Path(source).expanduser())["key"]
    return {"source": source} | ({"scale": scale} if scale is not None else {})


def _dispatch(client: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # Over Redis the tenant is a flag; over the API the key names it.
    tenant = {} if args.api else {"tenant": getattr(args, "tenant", "")}
    if args.command == "submit":
        request = build_request(args, lambda path: client.upload(path, **tenant))
        job = client.submit(request, idempotency_key=args.idempotency_key, priority=args.priority, **tenant)
        print(f"job {job.id} queued", file=err)
        print(job.id, file=out)
        if not args.wait:
            return 0
        return _follow(client, job.id, args, out, err)
    if args.command == "wait":
        return _follow(client, args.job_id, args, out, err)
    if args.command == "cancel":
        record = client.cancel(args.job_id)
        print(
            f"{record.id} {record.status.value}"
            # Still running: the cancel is asked for, and the job stops at its next step.
            + (" (stops at its next step)" if record.status is JobStatus.RUNNING else ""),
            file=out,
        )
        return 0
    if args.command == "delete":
        client.delete(args.job_id)
        print(f"{args.job_id} deleted", file=out)
        return 0
    if args.command == "list":
        records, _cursor = client.list(limit=args.limit, order=args.order, **tenant)
        for record in records:
            progress = f"{record.step}/{record.total_steps}" if record.total_steps else "-"
            print(
                f"{record.id}  {record.status.value:<9} {progress:>7}  {record.model:<22} {record.kind}",
                file=out,
            )
        return 0
    if args.command == "usage":
        usage = client.usage(args.start, args.end, **tenant)
        if args.json:
            print(json.dumps(usage.to_json(), indent=2), file=out)
        else:
            _print_usage(usage, out)
        return 0
    if args.command == "keys":
        return _keys(client, args, tenant, out, err)
    record = client.get(args.job_id)
    print(json.dumps(_as_json(record), indent=2), file=out)
    return 0


def _keys(client: Any, args: argparse.Namespace, tenant: dict[str, str], out: TextIO, err: TextIO) -> int:
    if args.action == "create":
        made, key = client.create_key(args.label, **tenant)
        print(f"key {made.id} made; it is shown only now", file=err)
        print(key, file=out)
    elif args.action == "list":
        for made in client.list_keys(**tenant):
            created = dt.datetime.fromtimestamp(made.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{made.id}  {created}  {made.label}".rstrip(), file=out)
    else:
        if not args.key_id:
            raise _Usage("keys revoke needs the key's id (keys list prints them)")
        client.revoke_key(args.key_id, **tenant)
        print(f"key {args.key_id} revoked", file=err)
    return 0


def _print_usage(usage: Usage, out: TextIO) -> None:
    print(f"tenant {usage.tenant}, {usage.start} to {usage.end} (UTC)", file=out)
    if usage.gpu_s_per_month is not None:
        print(f"GPU budget: {usage.gpu_s_per_month:g} GPU-seconds a month", file=out)
    head = ("date", "model", "class", "status", "jobs", "gpu_s", "outputs", "bytes", "video_s")
    lines = [head] + [
        (
            str(r.date),
            r.model,
            r.vram_class,
            r.status,
            str(r.jobs),
            f"{r.gpu_s:.1f}",
            str(r.outputs),
            str(r.output_bytes),
            f"{r.video_s:.1f}",
        )
        for r in usage.rows
    ]
    t = usage.totals
    lines.append(
        (
            "total",
            "",
            "",
            "",
            str(t.jobs),
            f"{t.gpu_s:.1f}",
            str(t.outputs),
            str(t.output_bytes),
            f"{t.video_s:.1f}",
        )
    )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        cells = [
            c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def _follow(client: Any, job_id: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    record = client.wait(job_id, timeout_s=args.timeout, on_progress=lambda r: _draw(r, err))
    _draw(record, err)
    print(file=err)
    if record.status is not JobStatus.SUCCEEDED:
        reason = record.error.message if record.error else ""
        print(f"job {job_id} {record.status.value}" + (f": {reason}" if reason else ""), file=err)
        return 1
    outputs = client.result(job_id)
    if args.out is not None:
        targets = [str(path.resolve()) for path in client.download(job_id, args.out)]
    else:
        targets = [output.url for output in outputs]
    for target, output in zip(targets, outputs, strict=True):
        size = f"{output.width}x{output.height}" if output.width else ""
        seed = f"seed {output.seed}" if output.seed is not None else ""
        print(f"output: {target} {output.content_type} {size} {seed}".rstrip(), file=out)
        if args.open:
            webbrowser.open(Path(target).as_uri() if args.out is not None else target)
    return 0


def _draw(record: JobRecord, err: TextIO) -> None:
    total = record.total_steps or 0
    done = record.step if total else 0
    filled = int(_BAR_WIDTH * done / total) if total else 0
    bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
    steps = f"{done}/{total}" if total else "-/-"
    notes = []
    position, eta_s = getattr(record, "queue_position", None), getattr(record, "eta_s", None)
    if record.status is JobStatus.QUEUED and position is not None:
        notes.append(f"position {position}")
    if eta_s is not None and not record.status.is_terminal():
        notes.append(f"eta {eta_s:.0f}s")
    counted = record.stage or "steps"  # a preprocessing stage counts frames (or videos)
    line = f"[{bar}] {steps:>7} {counted} {record.status.value:<9}" + (
        " " + ", ".join(notes) if notes else ""
    )
    err.write(f"\r{line:<80}")
    err.flush()


def _as_json(record: JobRecord) -> dict[str, Any]:
    data = asdict(record)
    data["status"] = record.status.value
    return data

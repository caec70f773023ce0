"""Command line for the fleet, on top of the SDK.

python -m producer submit z-image-turbo --prompt "a red fox" --width 512 --height 512 --wait
python -m producer status JOB_ID
python -m producer wait JOB_ID
python -m producer cancel JOB_ID

With ``--api URL --key KEY`` (or FLEET_API_URL / FLEET_API_KEY) the same commands go through the
HTTP API instead of Redis (``producer.http_cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from producer.client import Client
from routing.errors import FleetError, InvalidRequest
from routing.jobs.record import JobRecord, JobStatus

_BAR_WIDTH = 30


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
    submit.add_argument("--seed", type=int)
    submit.add_argument(
        "--num-outputs", type=int, help="images from one text-to-image job (seeds seed, seed+1, ...)"
    )
    submit.add_argument("--format", dest="output_format", help="png, webp or jpeg for images; mp4 for videos")
    submit.add_argument("--quality", dest="output_quality", type=int, help="webp/jpeg quality, 1-100")
    submit.add_argument("--idempotency-key")
    submit.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    submit.add_argument("--tenant", default="", help="whose job it is (the API sets this from the key)")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    submit.add_argument("--timeout", type=float, help="seconds to wait (with --wait)")
    submit.add_argument("--out", type=Path, help="save the outputs here (with --api and --wait)")
    submit.add_argument("--open", action="store_true", help="open the outputs (with --api and --wait)")

    for name, text in (
        ("status", "print a job's record"),
        ("wait", "follow a job to its end"),
        ("cancel", "cancel a job"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id")
        if name == "wait":
            command.add_argument("--timeout", type=float)
    listing = commands.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--tenant", default="")
    listing.add_argument("--limit", type=int, default=20)
    return parser


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.api:
            from producer.http_cli import dispatch

            return dispatch(args, out, err)
        with Client() as client:
            return _dispatch(client, args, out, err)
    except InvalidRequest as exc:
        for error in exc.errors:
            print(f"error: {error.field}: {error.message}", file=err)
        return 2
    except FleetError as exc:
        print(f"error: {exc}", file=err)
        return 1


def _dispatch(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.command == "submit":
        request: dict[str, Any] = {"model": args.model, "prompt": args.prompt}
        fields = ("kind", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed")
        for field in (*fields, "num_outputs", "output_format", "output_quality"):
            value = getattr(args, field)
            if value is not None:
                request[field] = value
        job = client.submit(
            request, idempotency_key=args.idempotency_key, priority=args.priority, tenant=args.tenant
        )
        print(f"job {job.id} queued", file=err)
        print(job.id, file=out)
        if not args.wait:
            return 0
        return _follow(client, job.id, args.timeout, out, err)
    if args.command == "wait":
        return _follow(client, args.job_id, args.timeout, out, err)
    if args.command == "cancel":
        record = client.cancel(args.job_id)
        print(
            f"{record.id} {record.status.value}"
            + (" (stops at its next step)" if record.cancel_requested else ""),
            file=out,
        )
        return 0
    if args.command == "list":
        for record in client.list_jobs(args.tenant, limit=args.limit):
            progress = f"{record.step}/{record.total_steps}" if record.total_steps else "-"
            print(
                f"{record.id}  {record.status.value:<9} {progress:>7}  {record.model:<22} {record.kind}",
                file=out,
            )
        return 0
    record = client.status(args.job_id)
    print(json.dumps(_as_json(record), indent=2), file=out)
    return 0


def _follow(client: Client, job_id: str, timeout_s: float | None, out: TextIO, err: TextIO) -> int:
    record = client.wait(job_id, timeout_s=timeout_s, on_progress=lambda r: _draw(r, err))
    _draw(record, err)
    print(file=err)
    if record.status is not JobStatus.SUCCEEDED:
        reason = record.error.message if record.error else ""
        print(f"job {job_id} {record.status.value}" + (f": {reason}" if reason else ""), file=err)
        return 1
    for output, stored in zip(client.result(job_id), record.outputs, strict=True):
        size = f"{output.width}x{output.height}" if output.width else ""
        seed = f"seed {stored.seed}" if stored.seed is not None else ""
        print(f"output: {output.url} {output.content_type} {size} {seed}".rstrip(), file=out)
    return 0


def _draw(record: JobRecord, err: TextIO) -> None:
    total = record.total_steps or 0
    done = record.step if total else 0
    filled = int(_BAR_WIDTH * done / total) if total else 0
    bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
    steps = f"{done}/{total}" if total else "-/-"
    err.write(f"\r[{bar}] {steps:>7} {record.status.value:<9}")
    err.flush()


def _as_json(record: JobRecord) -> dict[str, Any]:
    data = asdict(record)
    data["status"] = record.status.value
    return data

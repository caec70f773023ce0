"""The command line over the HTTP API (``python -m producer --api URL --key KEY ...``), on the
HTTP SDK: for a machine that has an API key and no Redis access. The commands and their output
are those of the Redis mode (``producer.cli``); ``submit --out DIR`` saves the outputs and
``--open`` shows them.
"""

from __future__ import annotations

import argparse
import json
import webbrowser
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from producer.http import Client, JobView
from routing.jobs.record import JobStatus


def dispatch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if not args.key:
        print("error: --api needs an API key: --key or FLEET_API_KEY", file=err)
        return 2
    with Client(args.api, args.key) as client:
        if args.command == "submit":
            request: dict[str, Any] = {"model": args.model, "prompt": args.prompt}
            for name in ("kind", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed"):
                value = getattr(args, name)
                if value is not None:
                    request[name] = value
            job = client.submit(request, idempotency_key=args.idempotency_key, priority=args.priority)
            print(f"job {job.id} queued", file=err)
            print(job.id, file=out)
            if not args.wait:
                return 0
            return _follow(client, job.id, args, out, err)
        if args.command == "wait":
            return _follow(client, args.job_id, args, out, err)
        if args.command == "cancel":
            record = client.cancel(args.job_id)
            print(f"{record.id} {record.status.value}", file=out)
            return 0
        if args.command == "list":
            jobs, _cursor = client.list(limit=args.limit)
            for record in jobs:
                progress = f"{record.step}/{record.total_steps}" if record.total_steps else "-"
                print(
                    f"{record.id}  {record.status.value:<9} {progress:>7}  {record.model:<22} {record.kind}",
                    file=out,
                )
            return 0
        record = client.get(args.job_id)
        print(json.dumps(_as_json(record), indent=2), file=out)
        return 0


def _follow(client: Client, job_id: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with tqdm(total=0, file=err, unit="step", dynamic_ncols=True, bar_format=_BAR) as bar:
        record = client.wait(job_id, timeout_s=args.timeout, on_progress=lambda r: _draw(bar, r))
        _draw(bar, record)
    if record.status is not JobStatus.SUCCEEDED:
        reason = (record.error or {}).get("message", "")
        print(f"job {job_id} {record.status.value}" + (f": {reason}" if reason else ""), file=err)
        return 1
    directory = getattr(args, "out", None)
    if directory is not None:
        targets = [str(p.resolve()) for p in client.download(job_id, directory)]
    else:
        targets = [o.url for o in record.outputs]
    for target, output in zip(targets, record.outputs, strict=True):
        size = f"{output.width}x{output.height}" if output.width else ""
        print(f"output: {target} {output.content_type} {size}".rstrip(), file=out)
        if getattr(args, "open", False):
            webbrowser.open(Path(target).as_uri() if directory is not None else target)
    return 0


_BAR = "{desc} |{bar}| {n_fmt}/{total_fmt} steps {postfix}"


def _draw(bar: tqdm, record: JobView) -> None:
    if record.total_steps and bar.total != record.total_steps:
        bar.total = record.total_steps
    bar.n = record.step
    bar.set_description_str(f"{record.status.value:<9}", refresh=False)
    notes = []
    if record.status is JobStatus.QUEUED and record.queue_position is not None:
        notes.append(f"position {record.queue_position}")
    if record.eta_s is not None and not record.status.is_terminal():
        notes.append(f"eta {record.eta_s:.0f}s")
    bar.set_postfix_str(", ".join(notes), refresh=False)
    bar.refresh()


def _as_json(record: JobView) -> dict[str, Any]:
    data = {name: getattr(record, name) for name in record.__dataclass_fields__}
    data["status"] = record.status.value
    data["outputs"] = [vars(o) for o in record.outputs]
    data["error"] = vars(record.error) if record.error else None
    data["webhook"] = vars(record.webhook) if record.webhook else None
    return data

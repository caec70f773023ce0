"""What each tenant used, by UTC day: the jobs that ended, the GPU time they took and the outputs
they stored. What a bill, a quota report or a tenant's own dashboard is made from.

Written by the Lua step that ends a job (``routing.jobs.scripts.TRANSITION``), in the same atomic
write as its final state: a job is counted once, on the day it ended, however its end was raced,
and usage never disagrees with the records. One hash per tenant and day (``Keys.usage``; the
tenant's store folder, ``_`` for jobs submitted with no tenant), its fields
``<model>|<class>|<status>|<measure>``, the class being the one the job ended on (after any
escalation) and the status its end:

    jobs           jobs that ended so
    held_s         seconds the attempt that ended the job held its worker: from its claim to the
                   end of generation (inputs, preprocessing, denoising, decoding), less the model's
                   load when the job found it cold (``timings.held_s``, written by the worker).
                   Attempts that did not end the job (its worker died, was stopped, or ran out of
                   memory and handed it to a bigger class) are the fleet's, and not counted; nor
                   is a job that never ran (canceled or expired while queued) or that the time
                   limit ended (its worker could not say)
    outputs        files stored (succeeded jobs)
    output_bytes   their size
    video_s        seconds of video among them (frames / fps)

GPU-seconds are ``held_s`` times the GPUs of the class (8 on ``h100x8``), counted as usage is
read. A monthly GPU budget is checked on every submit, so the month's held seconds by class are
also kept whole (``Keys.usage_month``): counted from the days once, on the tenant's first read of
the month, then added to by each job's end in the same step (``month_gpu_s``), one small read
per submit rather than a month of day hashes. Each day is kept ``usage_retention_days`` after it
(FLEET_USAGE_RETENTION_DAYS); the all-time GPU-seconds and jobs of every tenant are also
Prometheus counters (``producer.metrics``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from routing.classes import VramClass
from routing.errors import FieldError, InvalidRequest
from routing.jobs import scripts
from routing.jobs.codecs import parse_label
from routing.jobs.keys import Keys

if TYPE_CHECKING:  # the HTTP SDK reads Usage with no Redis client installed
    import redis

DAY_S = 86_400
DEFAULT_RETENTION_DAYS = 400  # FLEET_USAGE_RETENTION_DAYS
EPOCH = dt.date(1970, 1, 1)
# The measures a day's hash counts, in the order a row shows them.
MEASURES = ("jobs", "held_s", "outputs", "output_bytes", "video_s")
_INTEGERS = frozenset({"jobs", "outputs", "output_bytes"})


def day_of(timestamp: float) -> int:
    """The UTC day (days since 1970-01-01) ``timestamp`` (Unix seconds) falls on."""
    return int(timestamp // DAY_S)


def day_number(day: dt.date) -> int:
    return (day - EPOCH).days


def expire_at(day: int, retention_days: int) -> int:
    """When the usage of ``day`` expires (Unix seconds): ``retention_days`` after the day ends."""
    return (day + 1 + retention_days) * DAY_S


@dataclass(frozen=True)
class UsageRow:
    """One day's usage of one model on one class, by the jobs that ended one way."""

    date: dt.date
    model: str
    vram_class: str
    status: str
    jobs: int = 0
    gpu_s: float = 0.0  # held_s x the class's GPUs
    held_s: float = 0.0
    outputs: int = 0
    output_bytes: int = 0
    video_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "date": self.date.isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageRow:
        return cls(**{**data, "date": dt.date.fromisoformat(data["date"])})


@dataclass(frozen=True)
class UsageTotals:
    jobs: int = 0
    gpu_s: float = 0.0
    outputs: int = 0
    output_bytes: int = 0
    video_s: float = 0.0

    @classmethod
    def of(cls, rows: Iterable[UsageRow]) -> UsageTotals:
        sums = {f.name: 0 for f in fields(cls)}
        for row in rows:
            for name in sums:
                sums[name] += getattr(row, name)
        return cls(
            **{name: round(value, 4) if isinstance(value, float) else value for name, value in sums.items()}
        )


@dataclass(frozen=True)
class Usage:
    """A tenant's usage from ``start`` to ``end`` (UTC days, both included): a row per day,
    model, class and end, and their totals; beside them the tenant's GPU budget for a month
    (``gpu_s_per_month``, None for none), which the month to date, the default query, counts
    against. The one JSON shape the API sends, the SDKs return and the CLI prints."""

    tenant: str
    start: dt.date
    end: dt.date
    rows: list[UsageRow]
    totals: UsageTotals
    gpu_s_per_month: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "rows": [row.to_json() for row in self.rows],
            "totals": asdict(self.totals),
            "gpu_s_per_month": self.gpu_s_per_month,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Usage:
        return cls(
            tenant=data["tenant"],
            start=dt.date.fromisoformat(data["start"]),
            end=dt.date.fromisoformat(data["end"]),
            rows=[UsageRow.from_json(row) for row in data["rows"]],
            totals=UsageTotals(**data["totals"]),
            gpu_s_per_month=data.get("gpu_s_per_month"),
        )


def query_range(
    start: dt.date | None, end: dt.date | None, max_days: int, today: dt.date | None = None
) -> tuple[dt.date, dt.date]:
    """The days one query reads: ``end`` defaults to today (UTC), ``start`` to the first day of
    ``end``'s month (its month to date) or, where that spans more than ``max_days``, the
    earliest day within them. Raises ``InvalidRequest`` for a start after the end, or a span of
    more than ``max_days`` (FLEET_USAGE_MAX_DAYS)."""
    end = end or today or dt.datetime.now(dt.UTC).date()
    if start is None:
        start = max(month_start(end), end - dt.timedelta(days=max_days - 1))
    if start > end:
        raise InvalidRequest([FieldError("start", f"{start} is after end ({end})")])
    days = (end - start).days + 1
    if days > max_days:
        message = (
            f"{start} to {end} is {days} days; one query spans at most {max_days} (FLEET_USAGE_MAX_DAYS)"
        )
        raise InvalidRequest([FieldError("start", message)])
    return start, end


def month_start(day: dt.date) -> dt.date:
    return day.replace(day=1)


def next_month_at(day: dt.date) -> float:
    """When the UTC month after ``day``'s starts (Unix seconds): a monthly budget's renewal."""
    first = (month_start(day) + dt.timedelta(days=31)).replace(day=1)
    return day_number(first) * DAY_S


def read_usage(client: redis.Redis, keys: Keys, folder: str, start: dt.date, end: dt.date) -> Usage:
    """The usage of the tenant whose store folder is ``folder``, ``start`` to ``end``: one
    round trip, a ``HGETALL`` a day."""
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    with client.pipeline(transaction=False) as pipe:
        for day in days:
            pipe.hgetall(keys.usage(day_number(day), folder))
        hashes = pipe.execute()
    rows = [row for day, raw in zip(days, hashes, strict=True) for row in _rows(day, raw)]
    return Usage(folder, start, end, rows, UsageTotals.of(rows))


def month_of(day: int) -> str:
    """The UTC month ``day`` (days since 1970-01-01) falls in, as ``YYYY-MM``."""
    date = EPOCH + dt.timedelta(days=day)
    return f"{date.year:04d}-{date.month:02d}"


def month_gpu_s(client: redis.Redis, keys: Keys, folder: str, today: dt.date | None = None) -> float:
    """The GPU-seconds of the jobs of the tenant whose store folder is ``folder`` that ended this
    UTC month (``today``'s): what its ``gpu_s_per_month`` budget counts, as ``read_usage``'s
    totals of the month would say. One round trip and a hash of a field a class; the tenant's
    first read of a month counts its days into that hash."""
    today = today or dt.datetime.now(dt.UTC).date()
    first, after = day_number(month_start(today)), int(next_month_at(today)) // DAY_S
    # Every day of the month, those to come too: a worker's clock a little ahead of this one's
    # may have counted a job on tomorrow already.
    days = [keys.usage(day, folder) for day in range(first, after)]
    # Kept a day past the month: a worker's clock a little behind may still end a job in it.
    named = {
        "keys": {"month": keys.usage_month(month_of(first), folder), "days": days},
        "expire_at": str((after + 1) * DAY_S),
    }
    held = client.register_script(scripts.MONTH_HELD)(args=[json.dumps(named)])
    by_class = {_decoded(held[i]): float(held[i + 1]) for i in range(0, len(held), 2)}
    by_class.pop("counted")
    return round(sum(round(seconds * VramClass(name).gpus, 4) for name, seconds in by_class.items()), 4)


def tenants_with_usage(client: redis.Redis, keys: Keys, start: dt.date, end: dt.date) -> list[str]:
    """The folders of the tenants with any usage from ``start`` to ``end``, sorted."""
    numbers = range(day_number(start), day_number(end) + 1)
    with client.pipeline(transaction=False) as pipe:
        for number in numbers:
            pipe.smembers(keys.usage_tenants(number))
        members = pipe.execute()
    return sorted({_decoded(m) for found in members for m in found})


def _decoded(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _rows(day: dt.date, raw: dict[Any, Any]) -> list[UsageRow]:
    measures: dict[tuple[str, str, str], dict[str, float]] = {}
    for field, value in raw.items():
        field = _decoded(field)
        model, vram_class, status, measure = parse_label(field, 4)
        measures.setdefault((model, vram_class, status), {})[measure] = float(value)
    rows = []
    for (model, vram_class, status), found in sorted(measures.items()):
        counted = {
            m: int(found.get(m, 0)) if m in _INTEGERS else round(found.get(m, 0.0), 4) for m in MEASURES
        }
        gpu_s = round(counted["held_s"] * VramClass(vram_class).gpus, 4)
        rows.append(UsageRow(day, model, vram_class, status, gpu_s=gpu_s, **counted))
    return rows

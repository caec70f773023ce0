"""Capacity plan: the GPUs, instances and dollars a target rate of jobs needs, per VRAM class.

Two tables in ``routing/planning/data`` hold the inputs: ``gpu_seconds.csv`` (GPU-seconds one job takes
at the catalog's default size and steps, per model, task kind and class) and
``instance_prices.csv`` (on-demand price per instance type and the class it serves). Every row
says whether its figure was measured, published or estimated, and the plan prints that beside
each figure, so an estimate never passes for a measurement.

Per class, with ``u`` the target utilisation and ``b`` the GPU-busy share:

    GPU-seconds per hour = sum over rates of (jobs per hour x GPU-seconds per job)
    instances            = ceil(GPU-seconds per hour / b / (GPUs per instance x 3600 x u))
    utilisation          = GPU-seconds per hour / b / (instances x GPUs per instance x 3600)
    dollars per hour     = instances x instance price
    dollars per output   = the job's GPU-seconds x dollars per hour / GPU-seconds per hour

GPU-seconds per job are pipeline time; a worker with work spends a share ``b`` of its wall time
inside pipeline calls and the rest decoding, encoding, storing and recording what the GPU does
not overlap. ``b`` is measured by the workers (``worker.busy``; each class's totals in Redis,
read with ``measured_busy_shares``), or ``DEFAULT_BUSY_SHARE`` where the fleet has not measured it.

An h100x8 job holds all eight GPUs of its instance, so its GPU-seconds are eight times its wall
time. A job is planned on its catalog class (where ``routing.decision.route`` sends it at the
default size); spillover to idle bigger workers is left out: it uses capacity a plan has
already paid for.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routing.catalog import TaskKind, get_model
from routing.classes import VramClass
from routing.jobs.codecs import encode_label
from routing.jobs.keys import Keys

DATA_DIR = Path(__file__).parent / "data"
GPU_SECONDS_CSV = DATA_DIR / "gpu_seconds.csv"
INSTANCE_PRICES_CSV = DATA_DIR / "instance_prices.csv"

BASES = ("measured", "published", "estimate")
DEFAULT_TARGET_UTILISATION = 0.7
# The GPU-busy share where the fleet has not measured its own: the overlapped worker's goal for
# 1 s image jobs, not a measurement on a GPU host (bench/gpu_busy.py reached 0.886 on a loaded
# 2-core CPU machine with a sleeping stand-in, against 0.600 sequential). Plan with
# `--busy-share measured` once workers have run.
DEFAULT_BUSY_SHARE = 0.97
# Seconds with work a class needs before its measured share is used instead of the default.
MIN_MEASURED_WORK_S = 600.0

_PER_HOUR = {"s": 3600.0, "min": 60.0, "h": 1.0, "d": 1 / 24, "day": 1 / 24}


class PlanError(ValueError):
    """Bad input to the planner: a rate, a table row, an instance choice."""


@dataclass(frozen=True)
class JobCost:
    """GPU-seconds one job of ``model``/``kind`` takes on a worker of ``vram_class``."""

    model: str
    kind: TaskKind
    vram_class: VramClass
    gpu_seconds: float
    basis: str
    source: str

    @property
    def wall_seconds(self) -> float:
        """How long the job holds a worker of its class."""
        return self.gpu_seconds / self.vram_class.gpus


@dataclass(frozen=True)
class Instance:
    instance_type: str
    vram_class: VramClass
    gpus: int
    gpu: str
    usd_per_hour: float
    as_of: str
    basis: str
    default: bool
    source: str


@dataclass(frozen=True)
class Rate:
    model: str
    kind: TaskKind
    jobs_per_hour: float

    @property
    def label(self) -> str:
        return f"{self.model}:{self.kind.value}"


@dataclass(frozen=True)
class LinePlan:
    rate: Rate
    cost: JobCost
    gpu_seconds_per_hour: float
    usd_per_job: float


@dataclass(frozen=True)
class ClassPlan:
    vram_class: VramClass
    instance: Instance
    jobs_per_hour: float
    gpu_seconds_per_hour: float
    instances: int
    utilisation: float
    usd_per_hour: float
    lines: tuple[LinePlan, ...]
    busy_share: float = 1.0
    busy_basis: str = "assumed"

    @property
    def usd_per_job(self) -> float:
        return self.usd_per_hour / self.jobs_per_hour


@dataclass(frozen=True)
class Plan:
    target_utilisation: float
    classes: tuple[ClassPlan, ...]

    @property
    def usd_per_hour(self) -> float:
        return sum(c.usd_per_hour for c in self.classes)

    @property
    def jobs_per_hour(self) -> float:
        return sum(c.jobs_per_hour for c in self.classes)


# --- tables ------------------------------------------------------------------------------------


def _check_basis(basis: str, where: str) -> str:
    if basis not in BASES:
        raise PlanError(f"{where}: basis must be one of {', '.join(BASES)} (got {basis!r})")
    return basis


def load_job_costs(path: Path = GPU_SECONDS_CSV) -> dict[tuple[str, TaskKind, VramClass], JobCost]:
    """The GPU-seconds table, keyed by (model, kind, class)."""
    costs: dict[tuple[str, TaskKind, VramClass], JobCost] = {}
    with path.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            where = f"{path.name} line {line}"
            try:
                cost = JobCost(
                    model=get_model(row["model"]).key,
                    kind=TaskKind(row["kind"]),
                    vram_class=VramClass(row["vram_class"]),
                    gpu_seconds=float(row["gpu_seconds_per_job"]),
                    basis=_check_basis(row["basis"], where),
                    source=row["source"],
                )
            except (KeyError, ValueError) as exc:
                raise PlanError(f"{where}: {exc}") from None
            key = (cost.model, cost.kind, cost.vram_class)
            if key in costs:
                raise PlanError(f"{where}: a second row for {key}")
            costs[key] = cost
    return costs


def load_instances(path: Path = INSTANCE_PRICES_CSV) -> list[Instance]:
    instances: list[Instance] = []
    with path.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            where = f"{path.name} line {line}"
            try:
                instance = Instance(
                    instance_type=row["instance_type"],
                    vram_class=VramClass(row["vram_class"]),
                    gpus=int(row["gpus"]),
                    gpu=row["gpu"],
                    usd_per_hour=float(row["usd_per_hour"]),
                    as_of=row["as_of"],
                    basis=_check_basis(row["basis"], where),
                    default=row["default"] == "yes",
                    source=row["source"],
                )
            except (KeyError, ValueError) as exc:
                raise PlanError(f"{where}: {exc}") from None
            if instance.gpus % instance.vram_class.gpus:
                raise PlanError(
                    f"{where}: a {instance.vram_class} worker needs "
                    f"{instance.vram_class.gpus} GPUs; {instance.gpus} do not divide"
                )
            instances.append(instance)
    return instances


def choose_instances(
    instances: Iterable[Instance], overrides: Mapping[VramClass, str] | None = None
) -> dict[VramClass, Instance]:
    """The instance each class runs on: the table's default, or the type named in ``overrides``."""
    overrides = dict(overrides or {})
    chosen: dict[VramClass, Instance] = {}
    for instance in instances:
        wanted = overrides.get(instance.vram_class)
        if instance.instance_type == wanted or (wanted is None and instance.default):
            chosen[instance.vram_class] = instance
    for vram_class, wanted in overrides.items():
        if vram_class not in chosen:
            known = ", ".join(i.instance_type for i in instances if i.vram_class is vram_class)
            raise PlanError(f"no {wanted!r} instance for class {vram_class}; known: {known}")
    return chosen


# --- rates -------------------------------------------------------------------------------------


def resolve_kind(model: str, kind: str | None) -> tuple[str, TaskKind]:
    """The catalog key and task kind a rate names; the kind may be left out when the model does one."""
    try:
        spec = get_model(model)
    except KeyError as exc:
        raise PlanError(exc.args[0]) from None
    does = ", ".join(k.value for k in spec.task_kinds)
    if kind is None:
        if len(spec.task_kinds) != 1:
            raise PlanError(f"{spec.key} does several task kinds; name one ({spec.key}:KIND): {does}")
        return spec.key, spec.task_kinds[0]
    try:
        task_kind = TaskKind(kind)
    except ValueError:
        raise PlanError(f"unknown task kind {kind!r}; {spec.key} does: {does}") from None
    if task_kind not in spec.task_kinds:
        raise PlanError(f"{spec.key} does not do {kind}; it does: {does}")
    return spec.key, task_kind


def parse_amount(text: str) -> float:
    """Jobs per hour from ``N/h``, ``N/min``, ``N/s`` or ``N/d`` (a bare number is per hour)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:/\s*([a-z]+))?\s*", text)
    if match is None or (match.group(2) or "h") not in _PER_HOUR:
        raise PlanError(f"rate {text!r}: want a number per h, min, s or d, e.g. 120/h")
    value = float(match.group(1)) * _PER_HOUR[match.group(2) or "h"]
    if value <= 0:
        raise PlanError(f"rate {text!r}: must be above zero")
    return value


def parse_rate(text: str) -> Rate:
    """``MODEL[:KIND]=N/UNIT``, e.g. ``z-image-turbo=120/h``, ``wan2.2-ti2v-5b:text-to-video=20/h``."""
    target, sep, amount = text.partition("=")
    if not sep:
        raise PlanError(f"rate {text!r}: want MODEL[:KIND]=N/UNIT, e.g. z-image-turbo=120/h")
    model, _, kind = target.strip().partition(":")
    key, task_kind = resolve_kind(model, kind or None)
    return Rate(key, task_kind, parse_amount(amount))


def load_rates(path: Path) -> list[Rate]:
    """Rates from a JSON or YAML mapping of ``MODEL[:KIND]`` to ``N/UNIT`` (or a number per hour)."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise PlanError(f"{path}: want a mapping of MODEL[:KIND] to a rate such as 120/h")
    return [parse_rate(f"{target}={amount}") for target, amount in data.items()]


# --- the plan ----------------------------------------------------------------------------------


def home_class(model: str) -> VramClass:
    """The class a job of ``model`` is queued on at the catalog's default size."""
    return get_model(model).vram_class


def measured_busy_shares(
    client: Any, keys: Keys, min_work_s: float = MIN_MEASURED_WORK_S
) -> dict[VramClass, float]:
    """Each class's GPU-busy share as its workers measured it (busy seconds over seconds with
    work, summed over every worker that ran), for classes with at least ``min_work_s`` of work."""
    raw = {k.decode(): float(v) for k, v in client.hgetall(keys.metrics("gpu_busy")).items()}
    shares = {}
    for vram_class in VramClass:
        work_s = raw.get(encode_label(vram_class.value, "work_s"), 0.0)
        if work_s >= min_work_s:
            shares[vram_class] = min(1.0, raw.get(encode_label(vram_class.value, "busy_s"), 0.0) / work_s)
    return shares


def plan(
    rates: Sequence[Rate],
    costs: Mapping[tuple[str, TaskKind, VramClass], JobCost],
    instances: Mapping[VramClass, Instance],
    target_utilisation: float = DEFAULT_TARGET_UTILISATION,
    busy_share: float | Mapping[VramClass, float] | None = None,
) -> Plan:
    """``busy_share``: one share for every class, or measured ones by class (the default for
    the others); None: the default for every class."""
    if busy_share is None:
        busy_share = {}
    if not 0 < target_utilisation <= 1:
        raise PlanError(f"target utilisation must be in (0, 1] (got {target_utilisation})")
    for share in busy_share.values() if isinstance(busy_share, Mapping) else [busy_share]:
        if not 0 < share <= 1:
            raise PlanError(f"GPU-busy share must be in (0, 1] (got {share})")
    by_class: dict[VramClass, list[tuple[Rate, JobCost]]] = {}
    for rate in rates:
        vram_class = home_class(rate.model)
        cost = costs.get((rate.model, rate.kind, vram_class))
        if cost is None:
            raise PlanError(f"no GPU-seconds figure for {rate.label} on {vram_class}")
        by_class.setdefault(vram_class, []).append((rate, cost))

    classes: list[ClassPlan] = []
    for vram_class in sorted(by_class, key=lambda c: c.rank):
        instance = instances.get(vram_class)
        if instance is None:
            raise PlanError(f"no instance type chosen for class {vram_class}")
        pairs = by_class[vram_class]
        gpu_s_per_hour = sum(r.jobs_per_hour * c.gpu_seconds for r, c in pairs)
        gpu_s_per_instance_hour = instance.gpus * 3600.0
        if isinstance(busy_share, Mapping):
            busy, basis = (
                (busy_share[vram_class], "measured")
                if vram_class in busy_share
                else (DEFAULT_BUSY_SHARE, "default")
            )
        else:
            busy, basis = busy_share, "given"
        # GPU wall time the pipeline seconds take: they are a share `busy` of it.
        wall_s_per_hour = gpu_s_per_hour / busy
        count = math.ceil(wall_s_per_hour / (gpu_s_per_instance_hour * target_utilisation))
        usd_per_hour = count * instance.usd_per_hour
        lines = tuple(
            LinePlan(
                rate=r,
                cost=c,
                gpu_seconds_per_hour=r.jobs_per_hour * c.gpu_seconds,
                usd_per_job=c.gpu_seconds * usd_per_hour / gpu_s_per_hour,
            )
            for r, c in pairs
        )
        classes.append(
            ClassPlan(
                vram_class=vram_class,
                instance=instance,
                jobs_per_hour=sum(r.jobs_per_hour for r, _ in pairs),
                gpu_seconds_per_hour=gpu_s_per_hour,
                instances=count,
                utilisation=wall_s_per_hour / (count * gpu_s_per_instance_hour),
                usd_per_hour=usd_per_hour,
                lines=lines,
                busy_share=busy,
                busy_basis=basis,
            )
        )
    return Plan(target_utilisation=target_utilisation, classes=tuple(classes))


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def format_plan(result: Plan) -> str:
    out = [f"Capacity plan at {result.target_utilisation:.0%} target utilisation, on-demand prices", ""]
    rows = [
        ["class", "instance", "jobs/h", "GPU-s/h", "busy", "instances", "utilisation", "$/hour", "$/output"]
    ]
    for c in result.classes:
        rows.append(
            [
                c.vram_class.value,
                f"{c.instance.instance_type} ({c.instance.gpus} x {c.instance.gpu})",
                f"{c.jobs_per_hour:,.1f}",
                f"{c.gpu_seconds_per_hour:,.0f}",
                f"{c.busy_share:.2f} {c.busy_basis}",
                str(c.instances),
                f"{c.utilisation:.1%}",
                f"{c.usd_per_hour:,.2f}",
                f"{c.usd_per_job:.3g}",
            ]
        )
    out += _table(rows, right={2, 3, 5, 6, 7, 8})
    out += ["", f"Total: ${result.usd_per_hour:,.2f}/hour for {result.jobs_per_hour:,.1f} jobs/hour", ""]

    rows = [["model:kind", "class", "jobs/h", "GPU-s/job", "basis", "$/output"]]
    for c in result.classes:
        for line in c.lines:
            rows.append(
                [
                    line.rate.label,
                    c.vram_class.value,
                    f"{line.rate.jobs_per_hour:,.1f}",
                    f"{line.cost.gpu_seconds:g}",
                    line.cost.basis,
                    f"{line.usd_per_job:.3g}",
                ]
            )
    out += _table(rows, right={2, 3, 5})
    out += ["", "Prices:"]
    for c in result.classes:
        i = c.instance
        out.append(f"  {i.instance_type}: ${i.usd_per_hour:g}/hour, {i.basis}, as of {i.as_of}: {i.source}")
    out += [
        "",
        "One output per job, at the catalog's default size and steps. GPU-seconds assume an L4 for",
        "gpu16 and H100s for gpu80 and h100x8 (an A100 takes longer); figures marked estimate are",
        "reasoned, not measured; measured ones name the card and date: routing/planning/data/gpu_seconds.csv gives each one's reasoning or citation.",
        "busy: the share of a worker's time with work its GPU spends in pipeline calls (measured by",
        f"the fleet's workers, given, or the default {DEFAULT_BUSY_SHARE}, a goal, not measured); GPU-s/h",
        "are pipeline seconds, and instances are sized for GPU-s/h / busy.",
    ]
    return "\n".join(out)

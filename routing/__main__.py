"""Command line of the routing package: ``python -m routing plan --rate z-image-turbo=120/h``,
``python -m routing lifecycle [--apply]``, ``python -m routing memory [--json]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from routing.catalog import ModelSpec
from routing.classes import VramClass
from routing.io.storage import StorageError
from routing.planning import plan as planner


def _pair(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"want {what}")
    return key, value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m routing")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "plan",
        help="GPUs, instances and dollars for target job rates",
        description="Instances per VRAM class, utilisation, $/hour and $/job for target rates. "
        "Figures: routing/planning/data/gpu_seconds.csv and routing/planning/data/instance_prices.csv.",
    )
    p.add_argument(
        "--rate",
        action="append",
        default=[],
        metavar="MODEL[:KIND]=N/UNIT",
        help="target rate, e.g. z-image-turbo=120/h or wan2.2-ti2v-5b:text-to-video=20/h "
        "(units: s, min, h, d); repeat for more",
    )
    p.add_argument(
        "--rates",
        type=Path,
        metavar="FILE",
        help='JSON or YAML mapping of MODEL[:KIND] to a rate, e.g. {"z-image-turbo": "120/h"}',
    )
    p.add_argument(
        "--target-utilisation",
        type=float,
        default=planner.DEFAULT_TARGET_UTILISATION,
        metavar="U",
        help="share of GPU time to plan for, in (0, 1] (default %(default)s)",
    )
    p.add_argument(
        "--busy-share",
        metavar="B|measured",
        help="share of a worker's time with work its GPU spends in pipeline calls, in (0, 1]; "
        "'measured' reads what the fleet's workers measured (FLEET_REDIS_URL), per class, "
        f"with the default for classes without enough data (default {planner.DEFAULT_BUSY_SHARE}, "
        "the overlapped worker's goal, not a measurement)",
    )
    p.add_argument(
        "--instance",
        action="append",
        default=[],
        metavar="CLASS=TYPE",
        type=lambda t: _pair(t, "CLASS=TYPE, e.g. gpu80=p4de.24xlarge"),
        help="run CLASS on another instance type from the price table",
    )
    p.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="TYPE=USD",
        type=lambda t: _pair(t, "TYPE=USD, e.g. p5.48xlarge=55.04"),
        help="use this $/hour for an instance type instead of the table's",
    )
    lifecycle = commands.add_parser(
        "lifecycle",
        help="the S3 lifecycle rules of the retention settings",
        description="Prints the bucket lifecycle configuration (JSON) that expires outputs (jobs/), "
        "inputs (inputs/) and uploads (uploads/) after FLEET_RETENTION_*_DAYS, as "
        "'aws s3api put-bucket-lifecycle-configuration --lifecycle-configuration file://...' takes it.",
    )
    lifecycle.add_argument(
        "--apply",
        action="store_true",
        help="also put the rules on the fleet's bucket (FLEET_S3_*), replacing the bucket's own rules",
    )
    memory = commands.add_parser(
        "memory",
        help="per model and class: placement, weights, predicted peak at the largest request",
        description="Per served model and class that runs it: the placement mode, the weights (GiB, per "
        "rank when sharded), the largest request the class takes and its predicted peak against the "
        "card, less the margin (FLEET_VRAM_MARGIN_GIB), and whether the phase that sets the peak was "
        "measured on a GPU or is an estimate. Data: routing/memory/*.json.",
    )
    memory.add_argument("--json", action="store_true", help="a JSON list of objects instead of a table")
    memory.add_argument(
        "--modes",
        action="store_true",
        help="instead: every placement mode's footprint per model at its default request, and "
        "whether the workers apply it",
    )
    memory.add_argument(
        "--margin-gib", type=float, metavar="GIB", help="margin to plan with (default: FLEET_VRAM_MARGIN_GIB)"
    )
    return parser


def _memory(args: argparse.Namespace) -> str:
    import json

    from routing.catalog import CATALOG
    from routing.memory import table

    specs = [spec for spec in CATALOG.values() if spec.served]
    if args.modes:
        return _modes(specs, args.json)
    rows = list(table(specs, args.margin_gib))
    if args.json:
        return json.dumps([dataclasses.asdict(row) for row in rows], indent=1)
    header = [
        "model",
        "class",
        "mode",
        "weights GiB",
        "largest request",
        "peak GiB",
        "card GiB",
        "budget GiB",
        "peak",
    ]
    lines = [
        [
            r.model,
            r.vram_class,
            r.mode,
            f"{r.weights_gib:.1f}",
            r.largest,
            f"{r.peak_gib:.1f}",
            f"{r.card_gib:g}",
            f"{r.budget_gib:g}",
            f"{'measured' if r.measured else 'estimate'} ({r.phase})",
        ]
        for r in rows
    ]
    return _markdown(header, lines)


def _modes(specs: list[ModelSpec], as_json: bool) -> str:
    import json

    from routing.memory import modes_table

    rows = list(modes_table(specs))
    if as_json:
        return json.dumps([dataclasses.asdict(row) for row in rows], indent=1)
    header = [
        "model",
        "mode",
        "default request",
        "weights on GPU GiB",
        "peak GiB",
        "peak",
        "workers apply it",
    ]
    lines = [
        [
            r.model,
            r.mode + (" (FP8 card)" if r.needs_fp8_card else ""),
            r.request,
            f"{r.weights_on_gpu_gib:.1f}",
            f"{r.peak_gib:.1f}",
            "measured" if r.measured else "estimate",
            "yes" if r.applied_by_workers else "not yet",
        ]
        for r in rows
    ]
    return _markdown(header, lines)


def _markdown(header: list[str], lines: list[list[str]]) -> str:
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(rows + ["| " + " | ".join(line) + " |" for line in lines])


def _lifecycle(args: argparse.Namespace) -> str:
    import json

    from routing.io.retention import apply_lifecycle, lifecycle_configuration
    from routing.io.storage import S3Storage, make_storage
    from routing.settings import get_settings

    settings = get_settings()
    if args.apply:
        storage = make_storage(settings)
        if not isinstance(storage, S3Storage):
            raise StorageError("--apply is for FLEET_STORAGE_BACKEND=s3; the workers sweep a local store")
        apply_lifecycle(storage.client, storage.bucket, settings)
    return json.dumps(lifecycle_configuration(settings), indent=2)


def _plan(args: argparse.Namespace) -> str:
    rates = [planner.parse_rate(text) for text in args.rate]
    if args.rates is not None:
        rates += planner.load_rates(args.rates)
    if not rates:
        raise planner.PlanError("give at least one --rate or a --rates file")

    overrides = {}
    for vram_class, instance_type in args.instance:
        try:
            overrides[VramClass(vram_class)] = instance_type
        except ValueError:
            raise planner.PlanError(
                f"unknown class {vram_class!r}; known: {', '.join(c.value for c in VramClass)}"
            ) from None
    prices = {}
    for instance_type, usd in args.price:
        try:
            prices[instance_type] = float(usd)
        except ValueError:
            raise planner.PlanError(f"price {usd!r} for {instance_type}: want dollars per hour") from None

    instances = [
        dataclasses.replace(
            i,
            usd_per_hour=prices[i.instance_type],
            basis="given",
            as_of="now",
            source="--price on the command line",
        )
        if i.instance_type in prices
        else i
        for i in planner.load_instances()
    ]
    chosen = planner.choose_instances(instances, overrides)
    result = planner.plan(
        rates, planner.load_job_costs(), chosen, args.target_utilisation, _busy_share(args.busy_share)
    )
    return planner.format_plan(result)


def _busy_share(text: str | None) -> float | dict[VramClass, float] | None:
    if text is None:
        return None
    if text == "measured":
        from routing.io.connection import connect
        from routing.jobs.keys import Keys
        from routing.settings import get_settings

        settings = get_settings()
        return planner.measured_busy_shares(connect(settings), Keys(settings.key_prefix))
    try:
        return float(text)
    except ValueError:
        raise planner.PlanError(f"--busy-share {text!r}: want a number in (0, 1] or 'measured'") from None


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        commands = {"lifecycle": _lifecycle, "memory": _memory, "plan": _plan}
        print(commands[args.command](args))
    except (planner.PlanError, OSError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

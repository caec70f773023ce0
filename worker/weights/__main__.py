"""``python -m worker.weights pull|mirror|fill``: see the package's docstring."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from routing.catalog import weights_keys, weights_spec
from routing.io.storage import S3Storage, make_storage
from routing.settings import Settings, get_settings
from worker.weights.fill import MirrorMissing, WeightsError, fill
from worker.weights.hub import HubError, HuggingFaceHub, pull
from worker.weights.mirror import MirrorConflict, mirror


def default_folder(settings: Settings, model_key: str) -> Path:
    """Where ``pull`` writes and ``mirror`` reads: ``<FLEET_MODEL_ROOT>/<model>``, else
    ``models/<model>``."""
    return (settings.model_root or Path("models")) / model_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.weights", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pull_cmd = commands.add_parser("pull", help="the hub -> a local folder, at the catalog's revision")
    pull_cmd.add_argument("model", choices=weights_keys())
    pull_cmd.add_argument("--dir", type=Path, help="default: <FLEET_MODEL_ROOT or models>/<model>")
    mirror_cmd = commands.add_parser("mirror", help="a local folder -> the object store, with a manifest")
    mirror_cmd.add_argument("model", choices=weights_keys())
    mirror_cmd.add_argument("--dir", type=Path, help="default: <FLEET_MODEL_ROOT or models>/<model>")
    mirror_cmd.add_argument(
        "--replace",
        action="store_true",
        help="replace a mirror that holds other files (the nodes move to these on their next fill)",
    )
    fill_cmd = commands.add_parser(
        "fill", help="the object store -> the node cache (FLEET_WEIGHTS_CACHE_DIR)"
    )
    fill_cmd.add_argument("models", nargs="+", choices=weights_keys())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # One line a request from the HTTP client would bury the fleet's own lines on a big repository.
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    settings = get_settings()
    if args.command == "pull":
        spec = weights_spec(args.model)
        try:
            pulled = pull(spec, args.dir or default_folder(settings, spec.key), HuggingFaceHub())
        except (HubError, FileNotFoundError) as e:
            print(f"{spec.key}: not pulled: {e}", file=sys.stderr)
            return 1
        commits = ", ".join(f"{hub_id} at {commit}" for hub_id, commit in pulled.commits.items())
        print(f"{spec.key}: {len(pulled.files)} files of {commits} in {pulled.folder}")
        return 0
    storage = make_storage(settings)
    if args.command == "mirror":
        spec = weights_spec(args.model)
        if isinstance(storage, S3Storage):
            storage.ensure_bucket()
        try:
            manifest = mirror(
                storage, spec, args.dir or default_folder(settings, spec.key), replace=args.replace
            )
        except (MirrorConflict, FileNotFoundError) as e:
            print(f"{spec.key}: not mirrored: {e}", file=sys.stderr)
            return 1
        print(f"{spec.key}: {manifest.describe()}, at weights/{spec.key}/{spec.revision}/")
        return 0
    if settings.weights_cache_dir is None:
        parser.error("fill needs FLEET_WEIGHTS_CACHE_DIR: the node cache to fill")
    for key in args.models:
        try:
            report = fill(
                storage,
                weights_spec(key),
                settings.weights_cache_dir,
                chunk_bytes=settings.weights_fill_chunk_bytes,
                threads=settings.weights_fill_threads,
            )
        except MirrorMissing as e:
            # Not fatal: the worker loads such a model as configured (the hub, by default).
            print(f"{key}: not filled: {e}", file=sys.stderr)
            continue
        except WeightsError as e:
            print(f"{key}: {e}", file=sys.stderr)
            return 1
        commits = ", ".join(f"{hub_id}@{commit}" for hub_id, commit in sorted(report.commits.items()))
        print(
            f"{key}: {report.files} files ({report.total_bytes / 1e9:.2f} GB) in {report.folder}; "
            f"fetched {len(report.fetched)} ({report.fetched_bytes / 1e9:.2f} GB) in {report.seconds:.2f} s"
            + (f"; {commits}" if commits else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mirror``: a node-local model folder into the object store, under
``weights/<model key>/<revision>/``: its files under a folder named by their content
(``files-<digest>/``), then ``manifest.json`` (every file's path, size and sha256, and the commit
of every repository they came from). The manifest goes last, so a worker that finds one finds
every file it names.

The mirror is what every node fills, so it changes only on purpose. A folder pulled at another
commit than the catalog pins is refused; so is a folder whose files differ from those the
store's mirror holds already (a branch moved on upstream and was pulled again), unless
``replace`` says the fleet moves to them. A replaced mirror's old files stay where they were,
for fills still reading them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from routing.catalog import ModelSpec
from routing.io.storage import ObjectNotFound, S3Storage, Storage
from worker.weights.files import (
    Manifest,
    file_key,
    is_commit,
    manifest_key,
    manifest_of,
    select_extra,
    sources,
    store_prefix,
)
from worker.weights.hub import pulled_commits

log = logging.getLogger(__name__)

# Multipart parts for an S3 upload: one PUT takes at most 5 GB, and a 40 GB shard is common.
_PART_BYTES = 64 * 1024 * 1024


class MirrorConflict(Exception):
    """The folder is not what the mirror may hold: pulled at another commit than the catalog
    pins, or other files than the store's mirror has without ``replace``."""


def mirror(
    storage: Storage, spec: ModelSpec, folder: Path, *, threads: int = 8, replace: bool = False
) -> Manifest:
    """Upload ``folder`` (the model's files) as ``spec``'s mirror; the manifest stored."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no folder {folder}: pull the model first (`python -m worker.weights pull {spec.key}`)"
        )
    commits = pulled_commits(folder)
    for hub_id, revision in sources(spec):
        if is_commit(revision) and commits.get(hub_id) != revision:
            raise MirrorConflict(
                f"{spec.key}: the catalog pins {hub_id} at {revision}, and {folder} holds "
                f"{commits.get(hub_id) or 'files of no recorded commit'}: pull it again"
            )
    manifest = manifest_of(folder, spec, commits=commits)
    paths = [entry.path for entry in manifest.files]
    for extra in spec.extra_files:
        if not select_extra(paths, extra):
            raise FileNotFoundError(
                f"{folder} has none of the files {spec.key} takes from {extra.hub_id} "
                f"({', '.join(extra.patterns)}): pull it (`python -m worker.weights pull {spec.key}`)"
            )
    current = _current(storage, spec)
    if current is not None and set(current.files) != set(manifest.files) and not replace:
        raise MirrorConflict(
            f"{spec.key}: the store's mirror at {store_prefix(spec)} holds other files "
            f"({current.describe()}) than {folder} ({manifest.describe()}); every node fills "
            f"what it holds: mirror with --replace to move the fleet to these"
        )
    if current is None or current.files_at != manifest.files_at:
        for entry in manifest.files:
            log.info("%s: uploading %s (%.2f GB)", spec.key, entry.path, entry.size / 1e9)
            _upload(storage, file_key(spec, manifest, entry.path), folder / entry.path, threads)
    storage.put(manifest_key(spec), manifest.to_json().encode(), "application/json")
    log.info("%s: mirrored %s", spec.key, manifest.describe())
    if current is not None and current.files_at != manifest.files_at:
        log.warning(
            "%s: replaced %s; its files stay under %s%s/ for fills still reading them: delete them "
            "once none is",
            spec.key,
            current.describe(),
            store_prefix(spec),
            current.files_at,
        )
    return manifest


def _current(storage: Storage, spec: ModelSpec) -> Manifest | None:
    try:
        return Manifest.from_json(storage.get(manifest_key(spec)))
    except ObjectNotFound:
        return None


def _upload(storage: Storage, key: str, path: Path, threads: int) -> None:
    if isinstance(storage, S3Storage):
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=_PART_BYTES, multipart_chunksize=_PART_BYTES, max_concurrency=threads
        )
        storage.client.upload_file(
            str(path),
            storage.bucket,
            key,
            ExtraArgs={"ContentType": "application/octet-stream"},
            Config=config,
        )
    else:
        with open(path, "rb") as f:
            storage.put_file(key, f, "application/octet-stream")

"""``mirror``: a node-local model folder into the object store, under
``weights/<model key>/<revision>/``: its files under ``files/``, then ``manifest.json`` (every
file's path, size and sha256). The manifest goes last, so a worker that finds one finds every
file it names.
"""

from __future__ import annotations

import logging
from pathlib import Path

from routing.catalog import ModelSpec
from routing.io.storage import S3Storage, Storage
from worker.weights.files import Manifest, file_key, manifest_key, manifest_of
from worker.weights.hub import pulled_commit

log = logging.getLogger(__name__)

# Multipart parts for an S3 upload: one PUT takes at most 5 GB, and a 40 GB shard is common.
_PART_BYTES = 64 * 1024 * 1024


def mirror(storage: Storage, spec: ModelSpec, folder: Path, *, threads: int = 8) -> Manifest:
    """Upload ``folder`` (the model's files) as ``spec``'s mirror; the manifest stored."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no folder {folder}: pull the model first (`python -m worker.weights pull {spec.key}`)"
        )
    manifest = manifest_of(folder, spec, commit=pulled_commit(folder))
    for entry in manifest.files:
        log.info("%s: uploading %s (%.2f GB)", spec.key, entry.path, entry.size / 1e9)
        _upload(storage, file_key(spec, entry.path), folder / entry.path, threads)
    storage.put(manifest_key(spec), manifest.to_json().encode(), "application/json")
    log.info("%s: mirrored %d files, %.2f GB", spec.key, len(manifest.files), manifest.total_bytes / 1e9)
    return manifest


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

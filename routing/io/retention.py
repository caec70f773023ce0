"""How long stored objects live: one retention per kind of object, by its key's first segment.

    jobs/       outputs          FLEET_RETENTION_OUTPUTS_DAYS  (8)
    inputs/     inputs of a job  FLEET_RETENTION_INPUTS_DAYS   (7)
    uploads/    uploads          FLEET_RETENTION_UPLOADS_DAYS  (30)
    loras/      checked LoRAs    FLEET_RETENTION_LORAS_DAYS    (30)

On a local store the fleet deletes what is older itself: ``sweep_local``, run by every worker
from its liveness loop (``RetentionSweep``). An S3 bucket does it with lifecycle rules, which
``lifecycle_configuration`` builds from the same settings (``python -m routing lifecycle`` prints
them, ``--apply`` puts them on the bucket); ``deploy/s3-lifecycle.json`` holds the defaults'.

Age is the object's last write (a file's mtime; S3's creation time), so a redelivered job's
rewritten outputs count from their rewrite, and a LoRA (stored once by content hash, named by
many jobs) from the last request that named it: the API touches it (``Storage.touch``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from routing.io.storage import StorageError
from routing.settings import Settings

log = logging.getLogger(__name__)

DAY_S = 24 * 3600
# Kind -> key prefix, in the order the rules are listed.
PREFIXES = {"outputs": "jobs/", "inputs": "inputs/", "uploads": "uploads/", "loras": "loras/"}


def retention_days(settings: Settings) -> dict[str, int]:
    """Days an object is kept, by key prefix."""
    return {prefix: getattr(settings, f"retention_{kind}_days") for kind, prefix in PREFIXES.items()}


def lifecycle_configuration(settings: Settings) -> dict[str, Any]:
    """The bucket's lifecycle rules: what ``put-bucket-lifecycle-configuration`` takes."""
    days = retention_days(settings)
    return {
        "Rules": [
            {
                "ID": f"fleet-{kind}",
                "Filter": {"Prefix": prefix},
                "Status": "Enabled",
                "Expiration": {"Days": days[prefix]},
            }
            for kind, prefix in PREFIXES.items()
        ]
    }


def apply_lifecycle(client: Any, bucket: str, settings: Settings) -> None:
    """Put the rules on ``bucket`` (a boto3 S3 client); they replace the bucket's own rules."""
    try:
        client.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration=lifecycle_configuration(settings)
        )
    except (ClientError, BotoCoreError) as e:
        raise StorageError(f"putting lifecycle rules on {bucket!r}: {e}") from e


def sweep_local(root: Path, days_by_prefix: dict[str, int], now: float | None = None) -> list[str]:
    """Delete the files under ``root`` older than their kind's retention, and the directories
    left empty that nothing was written in for as long; return the deleted keys. Keys of no
    kind are kept. A temp file a killed write left (``.<name>.tmp``) goes like the objects
    beside it."""
    now = time.time() if now is None else now
    deleted: list[str] = []
    for prefix, days in days_by_prefix.items():
        top = root / prefix.rstrip("/")
        if not top.is_dir():
            continue
        cutoff = now - days * DAY_S
        # Every directory's mtime is read before anything is deleted (deleting changes it), and
        # they are visited deepest first, so a directory is looked at after everything in it.
        # A directory changed within the retention is kept even when empty: a write may have
        # just made it for an object it is about to put there.
        found = [(Path(d), _mtime(Path(d)), files) for d, _, files in os.walk(top)]
        for directory, changed_at, filenames in reversed(found):
            for name in filenames:
                path = directory / name
                if _mtime(path) < cutoff:
                    try:
                        path.unlink()
                        deleted.append(path.relative_to(root).as_posix())
                    except FileNotFoundError:
                        pass  # another worker's sweep got there first
                    except OSError as e:
                        log.warning("retention: keeping %s: %s", path, e)
            if directory != top and changed_at < cutoff:
                try:
                    directory.rmdir()  # only when empty
                except OSError:
                    pass
    return deleted


def _mtime(path: Path) -> float:
    """Seconds since the epoch of the last write; a path gone meanwhile reads as new (kept)."""
    try:
        return path.lstat().st_mtime
    except OSError:
        return float("inf")


class RetentionSweep:
    """Called from the liveness loop every few seconds; sweeps ``root`` once ``interval_s`` has
    passed, on a thread of its own: a sweep of a large store must never delay the heartbeat that
    keeps the worker's jobs its own."""

    def __init__(self, root: Path, days_by_prefix: dict[str, int], interval_s: float):
        self.root = Path(root)
        self.days_by_prefix = days_by_prefix
        self.interval_s = interval_s
        self._next = 0.0  # the first call sweeps
        self._running: threading.Thread | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> RetentionSweep | None:
        """The sweep of the fleet's local store; None for S3, whose lifecycle rules do it."""
        if settings.storage_backend != "local":
            return None
        return cls(settings.storage_dir, retention_days(settings), settings.retention_sweep_interval_s)

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self._next or (self._running is not None and self._running.is_alive()):
            return
        self._next = now + self.interval_s
        self._running = threading.Thread(target=self._sweep, name="retention", daemon=True)
        self._running.start()

    def _sweep(self) -> None:
        try:
            deleted = sweep_local(self.root, self.days_by_prefix)
        except Exception:
            log.exception("retention sweep of %s failed", self.root)
            return
        if deleted:
            log.info("retention: deleted %d objects past their kind's retention", len(deleted))

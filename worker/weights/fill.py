"""Filling a node's weights cache from the object store's mirror of a model.

The node's copy of a model is ``<cache>/<model key>/``, laid out as the model's folder, beside:

    <cache>/<model key>/.fleet/checked.json   what was last checked: size, mtime and sha256 a file
    <cache>/<model key>/.fleet/filled.json    the mirror it was last filled from: its commits
    <cache>/.<model key>.lock                 held while one process fills the folder

Whoever fills takes the model's lock (``flock``): a second worker on the node waits for it, then
finds the files right and fetches nothing. A missing file, or one whose size differs from the
manifest, is fetched again; one whose size is right but whose mtime changed since it was checked
is hashed again, and fetched again when its sha256 differs. Fetching is ranged reads of
``chunk_bytes`` from ``threads`` threads, written at their offsets into a temporary file in the
same folder, hashed in order as its chunks arrive, and renamed over the file only when it
matches: a reader sees the old file or the whole new one, never a part. Files the manifest does
not name are removed (an older revision's shards must not be loaded beside the new ones).

A node holds exactly what the store's manifest names, whatever the hub holds now: its files
change only when the mirror was replaced (``mirror --replace``), and the fill then says from
which commits to which.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from routing.catalog import ModelSpec
from routing.io.storage import ObjectNotFound, Storage
from worker.weights.files import FileEntry, Manifest, file_key, folder_files, manifest_key, sha256_of

log = logging.getLogger(__name__)

_BOOKKEEPING = ".fleet"
_PART_SUFFIX = ".part"
# Fetches of one file before the fill gives up on it (a store that keeps serving other bytes
# than the manifest says is not fixed by asking again and again).
_ATTEMPTS = 3


class WeightsError(Exception):
    """Base of the errors filling a cache raises."""


class MirrorMissing(WeightsError):
    """The object store has no mirror of the model (no manifest at its revision)."""


@dataclass
class FillReport:
    folder: Path
    files: int  # in the manifest
    total_bytes: int
    fetched: list[str] = field(default_factory=list)  # paths fetched from the store
    fetched_bytes: int = 0
    waited_s: float = 0.0  # for another process's fill to end
    seconds: float = 0.0
    commits: dict[str, str] = field(default_factory=dict)  # the mirror's, by hub id


def read_manifest(storage: Storage, spec: ModelSpec) -> Manifest:
    try:
        return Manifest.from_json(storage.get(manifest_key(spec)))
    except ObjectNotFound:
        raise MirrorMissing(
            f"no mirror of {spec.key} at revision {spec.revision} in the object store "
            f"({manifest_key(spec)}): run `python -m worker.weights mirror {spec.key}` where its weights are"
        ) from None


def fill(storage: Storage, spec: ModelSpec, cache_dir: Path, *, chunk_bytes: int, threads: int) -> FillReport:
    """Make ``<cache_dir>/<spec.key>`` match the store's manifest of ``spec``; what was done."""
    manifest = read_manifest(storage, spec)
    folder = cache_dir / spec.key
    folder.mkdir(parents=True, exist_ok=True)
    report = FillReport(folder, len(manifest.files), manifest.total_bytes, commits=manifest.commits)
    started = time.perf_counter()
    with _locked(cache_dir / f".{spec.key}.lock") as waited_s:
        report.waited_s = waited_s
        _note_the_mirror(folder, manifest)
        _remove_leftovers(folder, manifest)
        checked = _read_checked(folder)
        wrong = [entry for entry in manifest.files if not _is_right(folder, entry, checked)]
        for attempt in range(1, _ATTEMPTS + 1):
            if not wrong:
                break
            log.info(
                "%s: fetching %d of %d files (%.2f GB) from the object store, attempt %d",
                spec.key,
                len(wrong),
                len(manifest.files),
                sum(e.size for e in wrong) / 1e9,
                attempt,
            )
            fetched = _fetch(storage, spec, manifest, folder, wrong, chunk_bytes, threads, checked)
            report.fetched += [e.path for e in fetched]
            report.fetched_bytes += sum(e.size for e in fetched)
            wrong = [e for e in wrong if e not in fetched]
        _write_checked(folder, checked)
        if wrong:
            raise WeightsError(
                f"{spec.key}: {', '.join(e.path for e in wrong)} differed from the manifest after "
                f"{_ATTEMPTS} fetches: the mirror is damaged; mirror the model again"
            )
    report.seconds = time.perf_counter() - started
    log.info(
        "%s: node cache holds %d files (%.2f GB); fetched %d (%.2f GB) in %.2f s",
        spec.key,
        report.files,
        report.total_bytes / 1e9,
        len(report.fetched),
        report.fetched_bytes / 1e9,
        report.seconds,
    )
    return report


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[float]:
    """Hold ``lock_path``'s exclusive lock; yields the seconds spent waiting for it."""
    with open(lock_path, "a") as lock:
        started = time.perf_counter()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process filling %s", lock_path.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - started
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _note_the_mirror(folder: Path, manifest: Manifest) -> None:
    """Record which mirror the folder is filled from, saying so when it is another than before."""
    record = {"commits": manifest.commits, "files_at": manifest.files_at}
    path = folder / _BOOKKEEPING / "filled.json"
    try:
        before = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        before = None
    if before is not None and before != record:
        log.warning(
            "%s: the store's mirror was replaced: %s (was %s)",
            folder.name,
            manifest.describe(),
            ", ".join(f"{k}@{v}" for k, v in sorted(before.get("commits", {}).items()))
            or "no recorded commit",
        )
    path.parent.mkdir(exist_ok=True)
    _write_atomically(path, json.dumps(record, sort_keys=True).encode())


def _remove_leftovers(folder: Path, manifest: Manifest) -> None:
    """Remove what a killed fill left (temporary files), and files the manifest does not name.
    Only the lock's holder writes here, so none of them is being written now."""
    for part in folder.rglob(f".*{_PART_SUFFIX}"):
        part.unlink()
    named = {entry.path for entry in manifest.files}
    for rel in folder_files(folder):
        if rel not in named:
            log.info("%s: removing %s, which the manifest does not name", folder.name, rel)
            (folder / rel).unlink()


def _read_checked(folder: Path) -> dict[str, list[object]]:
    try:
        return json.loads((folder / _BOOKKEEPING / "checked.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_checked(folder: Path, checked: dict[str, list[object]]) -> None:
    (folder / _BOOKKEEPING).mkdir(exist_ok=True)
    _write_atomically(folder / _BOOKKEEPING / "checked.json", json.dumps(checked, sort_keys=True).encode())


def _stamp(path: Path, sha256: str) -> list[object]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, sha256]


def _is_right(folder: Path, entry: FileEntry, checked: dict[str, list[object]]) -> bool:
    """Whether the cached file is ``entry``: its size first, then its hash unless the file is
    unchanged since it was last found right."""
    path = folder / entry.path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size != entry.size:
        log.warning(
            "%s: %s has %d bytes, the manifest %d: fetching it again",
            folder.name,
            entry.path,
            size,
            entry.size,
        )
        return False
    if checked.get(entry.path) == _stamp(path, entry.sha256):
        return True
    digest = sha256_of(path)
    if digest != entry.sha256:
        log.warning("%s: %s has another sha256 than the manifest: fetching it again", folder.name, entry.path)
        return False
    checked[entry.path] = _stamp(path, digest)
    return True


class _Part:
    """A file being fetched: its temporary file, written at the offsets chunks arrive at, and
    its sha256, computed in order as the chunks before the next one to hash are all written (so
    the check runs alongside the download instead of after it)."""

    def __init__(self, entry: FileEntry, final: Path, chunk_bytes: int):
        self.entry = entry
        self.final = final
        self.chunk_bytes = chunk_bytes
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=_PART_SUFFIX)
        self.fd, self.tmp = fd, Path(tmp)
        os.ftruncate(fd, entry.size)
        self._digest = hashlib.sha256()
        self._hashed_to = 0
        self._written: set[int] = set()
        self._hashing = False
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        with self._lock:
            self._written.add(offset)
            if self._hashing:
                return  # the thread hashing this file takes it when it gets there
            self._hashing = True
        while True:
            with self._lock:
                if self._hashed_to not in self._written:
                    self._hashing = False
                    return
                self._written.remove(self._hashed_to)
                at = self._hashed_to
            length = min(self.chunk_bytes, self.entry.size - at)
            self._digest.update(os.pread(self.fd, length, at))
            with self._lock:
                self._hashed_to = at + length

    def settle(self) -> bool:
        """Whole and right: fsync and rename it into place. Else False, the file left as it was."""
        os.fsync(self.fd)
        if self._hashed_to != self.entry.size or self._digest.hexdigest() != self.entry.sha256:
            return False
        os.fchmod(self.fd, 0o644)
        os.replace(self.tmp, self.final)
        return True

    def close(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def _fetch(
    storage: Storage,
    spec: ModelSpec,
    manifest: Manifest,
    folder: Path,
    entries: list[FileEntry],
    chunk_bytes: int,
    threads: int,
    checked: dict[str, list[object]],
) -> list[FileEntry]:
    """Fetch ``entries`` into ``folder``, chunks of all of them in parallel; the ones that came
    whole and right, now in place."""
    parts: list[_Part] = []
    try:
        for entry in entries:
            (folder / entry.path).parent.mkdir(parents=True, exist_ok=True)
            parts.append(_Part(entry, folder / entry.path, chunk_bytes))
        chunks = [(part, offset) for part in parts for offset in range(0, part.entry.size, chunk_bytes)]

        def read_chunk(chunk: tuple[_Part, int]) -> None:
            part, offset = chunk
            length = min(chunk_bytes, part.entry.size - offset)
            data = storage.get_range(file_key(spec, manifest, part.entry.path), offset, length)
            if len(data) != length:
                raise WeightsError(
                    f"{part.entry.path}: the store gave {len(data)} bytes at {offset}, not {length}"
                )
            part.write(offset, data)

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="weights-fill") as pool:
            list(pool.map(read_chunk, chunks))
        fetched = []
        for part in parts:
            if part.settle():
                checked[part.entry.path] = _stamp(part.final, part.entry.sha256)
                fetched.append(part.entry)
            else:
                log.warning("%s: fetched %s does not match the manifest's sha256", spec.key, part.entry.path)
        return fetched
    finally:
        for part in parts:
            part.close()


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PART_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

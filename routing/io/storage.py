"""Object storage for job outputs: one interface, a local-directory backend and an S3 backend.

Errors: every failure a backend reports is a ``StorageError``, so a caller that only wants to
know "did the store work" catches one class. ``ObjectNotFound`` (a ``StorageError``) is the one
failure callers branch on: ``get`` of a key that does not exist. A malformed key (absolute,
``..``, empty segment, ...) is a programming error, not a storage failure, and raises
``ValueError`` before any I/O happens; both backends apply the same key rules so code that works
against one works against the other.

Keys of job outputs come from ``output_key``, which depends on the job id, the attempt and the
output index: each run of a job writes under its own attempt, so a worker that was thought dead
and goes on writing can never overwrite the outputs of the attempt that now owns the job.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import SecretStr

from routing.settings import Settings


class StorageError(Exception):
    """Base of every error a storage backend raises."""


class ObjectNotFound(StorageError):
    """The key does not exist in the store."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclass(frozen=True)
class StoredObject:
    key: str
    size_bytes: int
    content_type: str
    sha256: str  # hex digest of the bytes written; computed the same way by both backends


# Backends have a method named `list`, which shadows the builtin inside their class bodies for
# type checkers; annotations there say `builtins.list`.


@runtime_checkable
class Storage(Protocol):
    """What the fleet needs from an object store; `make_storage` picks the implementation."""

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject: ...
    def put_file(self, key: str, file: BinaryIO, content_type: str) -> StoredObject: ...
    def get(self, key: str) -> bytes: ...
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def touch(self, key: str) -> bool: ...
    def url(self, key: str, expires_s: int | None = None) -> str: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> builtins.list[str]: ...


_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{8,64}")
_EXT = re.compile(r"[a-z0-9]{1,16}")


def output_key(job_id: str, attempt: int, index: int, ext: str) -> str:
    """Key of the ``index``-th output of a job's ``attempt``-th run:
    ``jobs/<job_id>/attempt-<attempt>/output-<index>.<ext>``."""
    # Lowercase only: "ABCD..." and "abcd..." would otherwise be two keys for one job.
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id must be a lowercase hex token or uuid, got {job_id!r}")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be a positive int, got {attempt!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"output index must be a non-negative int, got {index!r}")
    ext = ext.removeprefix(".").lower()
    if not _EXT.fullmatch(ext):
        raise ValueError(f"extension must be 1-16 letters or digits, got {ext!r}")
    return f"jobs/{job_id}/attempt-{attempt}/output-{index}.{ext}"


def job_folder(job_id: str) -> str:
    """``jobs/<job_id>/``: the prefix of every object a job's runs store (``output_key``), and of
    what is made from them."""
    output_key(job_id, 1, 0, "x")  # the same check of the id
    return f"jobs/{job_id}/"


def _check_key(key: str) -> str:
    # Segments starting with "." are refused: that rules out "." and "..", and leaves the
    # dot-namespace free for LocalStorage's temp files, which list() can then skip safely.
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 1:
        raise ValueError(f"a range needs offset >= 0 and length >= 1, got {offset}, {length}")


def _stored(key: str, data: bytes, content_type: str) -> StoredObject:
    return StoredObject(key, len(data), content_type, hashlib.sha256(data).hexdigest())


def _stored_file(key: str, file: BinaryIO, content_type: str) -> StoredObject:
    """What ``put_file`` stores of ``file`` (read from its start, a chunk at a time)."""
    file.seek(0)
    digest = hashlib.file_digest(file, "sha256")  # type: ignore[arg-type]
    # Not file.tell(): file_digest reads a BytesIO through its buffer, leaving it at 0.
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    return StoredObject(key, size, content_type, digest.hexdigest())


class LocalStorage:
    """Objects as files under ``root``; key ``a/b.png`` is ``root/a/b.png``.

    Content type is not persisted: a ``file://`` URL carries no headers, so whoever reads the
    file goes by its extension, which ``output_key`` always sets.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = self.root / _check_key(key)
        # The lexical check above misses a symlink inside root that points outside it.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} escapes the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        self._write(key, lambda f: f.write(data))
        return _stored(key, data, content_type)

    def put_file(self, key: str, file: BinaryIO, content_type: str) -> StoredObject:
        """``put`` of what ``file`` holds from its start, copied a chunk at a time."""
        stored = _stored_file(key, file, content_type)
        self._write(key, lambda f: shutil.copyfileobj(file, f, 1 << 20))
        return stored

    def _write(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Temp file in the same directory so os.replace is an atomic rename on one
            # filesystem: readers see the old file or the new one, never a partial one.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; other readers (web server) need r
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise StorageError(f"writing {key!r}: {e}") from e

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise StorageError(f"reading {key!r}: {e}") from e

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``key`` from ``offset`` (fewer at its end)."""
        _check_range(offset, length)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise StorageError(f"reading {key!r}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def touch(self, key: str) -> bool:
        """Make ``key``'s last write now (retention counts from it); False when there is none."""
        path = self._path(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StorageError(f"touching {key!r}: {e}") from e
        return path.is_file()

    def url(self, key: str, expires_s: int | None = None) -> str:
        """A ``file://`` URI; ``expires_s`` is accepted for interface parity and ignored."""
        return self._path(key).as_uri()

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error (same as S3)."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"deleting {key!r}: {e}") from e

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Keys starting with ``prefix`` (a string prefix, as in S3, not a directory), sorted."""
        # Walk only the deepest directory the prefix names, not the whole root.
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not base.resolve().is_relative_to(self.root) or not base.is_dir():
            return []
        keys: builtins.list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(".") and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


class S3Storage:
    """Objects in one S3 bucket; works against AWS, MinIO and moto alike."""

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        presign_expiry_s: int = 3600,
    ) -> None:
        self.bucket = bucket
        self.region = region
        self.presign_expiry_s = presign_expiry_s
        # Path-style addressing: MinIO/moto on 127.0.0.1 have no per-bucket DNS names.
        # None credentials fall through to boto3's default chain (env, instance role).
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(
                signature_version="s3v4",
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (demo and tests; production buckets exist)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except _BOTO_ERRORS as e:
            if _error_code(e) not in _NO_BUCKET:
                raise StorageError(f"checking bucket {self.bucket!r}: {e}") from e
        kwargs: dict[str, object] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
        except _BOTO_ERRORS as e:
            # Another process may have created it between the head and the create.
            if _error_code(e) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise StorageError(f"creating bucket {self.bucket!r}: {e}") from e

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        _check_key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except _BOTO_ERRORS as e:
            raise StorageError(f"writing {key!r}: {e}") from e
        return _stored(key, data, content_type)

    def put_file(self, key: str, file: BinaryIO, content_type: str) -> StoredObject:
        """``put`` of what ``file`` holds from its start, streamed to the bucket."""
        _check_key(key)
        stored = _stored_file(key, file, content_type)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=file,
                ContentLength=stored.size_bytes,
                ContentType=content_type,
            )
        except _BOTO_ERRORS as e:
            raise StorageError(f"writing {key!r}: {e}") from e
        return stored

    def get(self, key: str) -> bytes:
        _check_key(key)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except _BOTO_ERRORS as e:
            # NoSuchBucket stays a plain StorageError: a misconfigured bucket must not read
            # as "this output was never written".
            if _error_code(e) in _NO_KEY:
                raise ObjectNotFound(key) from None
            raise StorageError(f"reading {key!r}: {e}") from e

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``key`` from ``offset`` (fewer at its end): one ranged GET."""
        _check_key(key)
        _check_range(offset, length)
        try:
            answer = self.client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
            )
            return answer["Body"].read()
        except _BOTO_ERRORS as e:
            if _error_code(e) in _NO_KEY:
                raise ObjectNotFound(key) from None
            raise StorageError(f"reading {key!r}: {e}") from e

    def exists(self, key: str) -> bool:
        _check_key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except _BOTO_ERRORS as e:
            if _error_code(e) in _NO_KEY:
                return False
            raise StorageError(f"checking {key!r}: {e}") from e

    def touch(self, key: str) -> bool:
        """Make ``key``'s last write now, so lifecycle rules count its age from now: the object
        is copied onto itself, on the server (no bytes pass through here). False when there is
        no such object."""
        _check_key(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                MetadataDirective="REPLACE",  # S3 refuses a copy onto itself that changes nothing
                ContentType=head.get("ContentType", "application/octet-stream"),
                Metadata=head.get("Metadata", {}),
            )
        except _BOTO_ERRORS as e:
            if _error_code(e) in _NO_KEY:
                return False
            raise StorageError(f"touching {key!r}: {e}") from e
        return True

    def url(self, key: str, expires_s: int | None = None) -> str:
        """A presigned GET URL valid for ``expires_s`` (default: the configured expiry)."""
        _check_key(key)
        expires = self.presign_expiry_s if expires_s is None else expires_s
        if expires <= 0:
            raise ValueError(f"expires_s must be positive, got {expires}")
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
            )
        except _BOTO_ERRORS as e:
            raise StorageError(f"presigning {key!r}: {e}") from e

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        _check_key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except _BOTO_ERRORS as e:
            raise StorageError(f"deleting {key!r}: {e}") from e

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Keys starting with ``prefix``, sorted."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
        except _BOTO_ERRORS as e:
            raise StorageError(f"listing {prefix!r}: {e}") from e


# ClientError: the service answered with an error; BotoCoreError: it could not be reached, or
# the request could not be built (no credentials, bad endpoint).
_BOTO_ERRORS = (ClientError, BotoCoreError)
# HEAD responses have no body, so head_* answer a bare "404"; get_object says "NoSuchKey".
_NO_KEY = {"404", "NotFound", "NoSuchKey"}
_NO_BUCKET = {"404", "NotFound", "NoSuchBucket"}


def _error_code(e: Exception) -> str | None:
    return e.response.get("Error", {}).get("Code") if isinstance(e, ClientError) else None


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def make_storage(settings: Settings) -> Storage:
    """The backend ``settings.storage_backend`` names, configured from ``settings``."""
    if settings.storage_backend == "local":
        return LocalStorage(settings.storage_dir)
    if settings.storage_backend == "s3":
        return S3Storage(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=_secret(settings.s3_access_key_id),
            secret_access_key=_secret(settings.s3_secret_access_key),
            presign_expiry_s=settings.presign_expiry_s,
        )
    raise ValueError(f"unknown storage backend {settings.storage_backend!r}")

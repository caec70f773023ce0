"""Input media of a request, made safe to queue.

Before a job is queued every image and video it names is read (from the fleet's store, from an
http(s) URL through the SSRF-guarded fetcher, or from a base64 data URL), decoded and checked
against limits. Media given by URL (a data URL too) is stored under ``inputs/<tenant>/<job id>/``,
deleted with the job, and the queued request names every input by store key: the worker reads only
bytes that were checked, and never reaches out to the internet.
A store key is read only if the tenant may name it (``producer.tenant_keys``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import logging
import mimetypes
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from producer.tenant_keys import KeyScope, input_prefix, lora_key, upload_key
from routing.catalog import CATALOG, ModelSpec, get_model
from routing.errors import FieldError, InvalidRequest
from routing.io.loras import (
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_TENSORS,
    LoraError,
    check_lora,
    read_header,
)
from routing.io.media import (
    AudioInfo,
    DecodeBudget,
    DecodeBudgetError,
    ImageInfo,
    MediaError,
    VideoInfo,
    check_audio,
    check_image,
    check_video,
)
from routing.io.net import UrlError, UrlPolicy, fetch_into
from routing.io.storage import ObjectNotFound, Storage, StorageError
from routing.schemas import AUDIO_FIELDS, MAX_KEY_CHARS, VIDEO_FIELDS, MediaRef, RequestBase, is_data_url

log = logging.getLogger(__name__)

# The longest video any model takes, in frames and in seconds: what an upload may be (speech is
# never longer than the longest video either).
_UPLOAD_MAX_FRAMES = max(spec.video.max_frames for spec in CATALOG.values() if spec.video)
_UPLOAD_MAX_DURATION_S = max(
    spec.video.max_frames / spec.video.fps for spec in CATALOG.values() if spec.video
)
_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int = 200 * 1024 * 1024
    image_max_pixels: int = 40_000_000
    image_max_side: int = 8192
    video_max_side: int = 4096
    # Every fetch of one request together, connect to last byte: one deadline per request.
    fetch_timeout_s: float = 15.0
    # Decoded pixels of all of a job's input videos together, as the worker holds them: each
    # frame at most the output's size (worker.media.decode_video scales it down while decoding).
    video_max_pixels: int = 1024 * 1024 * 1024
    # Pixels the API decodes checking one request's videos (or one upload), at their source size:
    # width x height x frames, counted before decoding from the container's metadata and while
    # decoding.
    video_max_decode_pixels: int = 4 * 1024 * 1024 * 1024
    lora_max_bytes: int = 2 * 1024**3
    lora_max_rank: int = 64
    lora_max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    lora_max_tensors: int = DEFAULT_MAX_TENSORS
    lora_hub: bool = False


def fetch_deadline(limits: InputLimits) -> float:
    """The one deadline (``time.monotonic()``) every fetch of a request starting now shares."""
    return time.monotonic() + limits.fetch_timeout_s


def fetches(request: RequestBase) -> bool:
    """Whether resolving ``request`` downloads anything (a media URL, a LoRA by URL or hub id)."""
    urls = any(ref.url is not None and not is_data_url(ref.url) for ref in _refs(request))
    return urls or any(not _is_store_key(lora.source) for lora in request.loras or [])


def _is_store_key(source: str) -> bool:
    if source.lower().startswith(("http://", "https://")):
        return False
    hub = _HUB_ID.match(source)
    return hub is None or hub.group(1) in _STORE_KINDS


def resolve_inputs(
    request: RequestBase,
    job_id: str,
    storage: Storage,
    policy: UrlPolicy,
    limits: InputLimits,
    scope: KeyScope,
    deadline: float | None = None,
) -> RequestBase:
    """Check every input of ``request``; return it with each input named by store key. Every
    download ends by ``deadline`` (default: ``fetch_deadline(limits)``).

    Raises ``InvalidRequest`` naming the field (``image``, ``images.1``, ``pose_video``) of
    every input that could not be read or is not acceptable media; what was stored of it by then
    is deleted again.
    """
    try:
        deadline = fetch_deadline(limits) if deadline is None else deadline
        resolved, errors = _resolve_all(request, job_id, storage, policy, limits, scope, deadline)
    except BaseException:
        delete_inputs(request, job_id, storage, scope.tenant)
        raise
    if errors:
        delete_inputs(request, job_id, storage, scope.tenant)
        raise InvalidRequest(errors)
    return resolved


def delete_inputs(request: RequestBase, job_id: str, storage: Storage, tenant: str) -> None:
    """Delete what ``resolve_inputs`` stored for job ``job_id`` (the media it was given by URL),
    when the job is not queued after all. ``request`` is the one given or the one resolved."""
    prefix = input_prefix(tenant, job_id)
    if not any(ref.url is not None or (ref.key or "").startswith(prefix) for ref in _refs(request)):
        return
    try:
        for key in storage.list(prefix):
            storage.delete(key)
    except StorageError as exc:  # the request's own answer stands; this is only logged
        log.warning("could not delete the inputs of job %s, which was not queued: %s", job_id, exc)


def _refs(request: RequestBase) -> list[MediaRef]:
    return [
        ref
        for value in request.media_fields().values()
        for ref in (value if isinstance(value, list) else [value])
    ]


def _resolve_all(
    request: RequestBase,
    job_id: str,
    storage: Storage,
    policy: UrlPolicy,
    limits: InputLimits,
    scope: KeyScope,
    deadline: float,
) -> tuple[RequestBase, list[FieldError]]:
    spec = get_model(request.model)
    errors: list[FieldError] = []
    update: dict[str, object] = {}
    output_pixels = (request.width or spec.size.default_width) * (request.height or spec.size.default_height)
    video_pixels, over = 0, False
    budget = DecodeBudget(limits.video_max_decode_pixels)
    for name, value in request.media_fields().items():
        refs = value if isinstance(value, list) else [value]
        resolved = []
        for index, ref in enumerate(refs):
            field = f"{name}.{index}" if isinstance(value, list) else name
            try:
                checked, info = _resolve_one(
                    ref, field, name, job_id, spec, storage, policy, limits, scope, deadline, budget
                )
                resolved.append(checked)
            except (MediaError, UrlError) as exc:
                errors.append(FieldError(field, str(exc)))
                continue
            if isinstance(info, VideoInfo):
                video_pixels += min(info.width * info.height, output_pixels) * info.frames
                if video_pixels > limits.video_max_pixels and not over:  # name the first field over
                    message = (
                        f"the job's videos decode to more than {limits.video_max_pixels} pixels "
                        "(width x height x frames, each frame at most the output size); send fewer "
                        "or shorter videos"
                    )
                    errors.append(FieldError(field, message))
                    over = True
        update[name] = resolved if isinstance(value, list) else (resolved[0] if resolved else value)
    return request.model_copy(update=update), errors


# A hub id: owner/repo/path/to/file.safetensors (no scheme).
_HUB_ID = re.compile(r"^([\w.-]+)/([\w.-]+)/([\w./-]+\.safetensors)$")
_STORE_KINDS = ("uploads", "inputs", "jobs", "loras")


def resolve_loras(
    request: RequestBase,
    storage: Storage,
    policy: UrlPolicy,
    limits: InputLimits,
    scope: KeyScope,
    deadline: float | None = None,
) -> RequestBase:
    """Check every LoRA of ``request``; return it with each one named by its tenant's
    content-addressed store key (``loras/<tenant>/<sha256>.safetensors``), whose digest is also
    the worker's cache key. Every download ends by ``deadline`` (default:
    ``fetch_deadline(limits)``).

    Raises ``InvalidRequest`` naming the field (``loras.1.source``) of each LoRA refused. Every
    check, the ranks' sum included, is made before anything is stored: a refused request stores
    nothing.
    """
    spec = get_model(request.model)
    deadline = fetch_deadline(limits) if deadline is None else deadline
    errors: list[FieldError] = []
    checked: list[tuple[BinaryIO, str]] = []
    total_rank = 0
    with contextlib.ExitStack() as files:
        for index, lora in enumerate(request.loras or []):
            try:
                file, digest = files.enter_context(
                    _read_lora(lora.source, storage, policy, limits, scope, deadline)
                )
                info = check_lora(
                    file,
                    spec,
                    limits.lora_max_bytes,
                    max_header_bytes=limits.lora_max_header_bytes,
                    max_tensors=limits.lora_max_tensors,
                )
            except (LoraError, MediaError, UrlError) as exc:
                errors.append(FieldError(f"loras.{index}.source", str(exc)))
                continue
            total_rank += info.rank
            checked.append((file, digest))
        if not errors and total_rank > limits.lora_max_rank:
            errors.append(
                FieldError(
                    "loras", f"the LoRAs' ranks add up to {total_rank}; at most {limits.lora_max_rank}"
                )
            )
        if errors:
            raise InvalidRequest(errors)
        resolved = []
        for lora, (file, digest) in zip(request.loras or [], checked, strict=True):
            key = lora_key(scope.tenant, digest)
            # Stored once for every request of the tenant that names it; each one makes it young
            # again, so the retention of loras/ counts from the last request that named it.
            if not storage.touch(key):
                storage.put_file(key, file, "application/octet-stream")
            resolved.append(lora.model_copy(update={"source": key}))
    return request.model_copy(update={"loras": resolved})


class _Spool:
    """A temporary file that hashes what is written to it: a download is held on disk, never in
    memory, and its digest is known when its last byte is."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.sha256 = hashlib.sha256()

    def write(self, chunk: bytes) -> int:
        self.sha256.update(chunk)
        return self.file.write(chunk)

    def tell(self) -> int:
        return self.file.tell()


@contextlib.contextmanager
def _download(url: str, max_bytes: int, deadline: float, policy: UrlPolicy) -> Iterator[tuple[BinaryIO, str]]:
    """``url``'s body in a temporary file (deleted on leaving), and its sha256."""
    spool = _Spool()
    with spool.file:
        fetch_into(url, spool, max_bytes=max_bytes, deadline=deadline, policy=policy)
        spool.file.seek(0)
        yield spool.file, spool.sha256.hexdigest()


@contextlib.contextmanager
def _read_lora(
    source: str, storage: Storage, policy: UrlPolicy, limits: InputLimits, scope: KeyScope, deadline: float
) -> Iterator[tuple[BinaryIO, str]]:
    """The LoRA file ``source`` names, and its sha256."""
    fetch = (limits.lora_max_bytes, deadline, policy)
    if source.lower().startswith(("http://", "https://")):
        with _download(source, *fetch) as found:
            yield found
        return
    hub = _HUB_ID.match(source)
    # A key of one of the store's kinds is never a hub id: whether it exists must not decide
    # which error another tenant's key gets.
    if hub is not None and hub.group(1) not in _STORE_KINDS:
        if not limits.lora_hub:
            raise LoraError(
                "hub ids are not accepted by this fleet (FLEET_LORA_HUB is off): upload the file "
                "or give an https URL"
            )
        owner, repo, path = hub.groups()
        with _download(f"https://huggingface.co/{owner}/{repo}/resolve/main/{path}", *fetch) as found:
            yield found
        return
    if len(source) > MAX_KEY_CHARS:
        raise LoraError(f"a store key has at most {MAX_KEY_CHARS} characters (an upload's key is shorter)")
    data = _read(storage, source, scope)
    yield io.BytesIO(data), hashlib.sha256(data).hexdigest()


def _resolve_one(
    ref: MediaRef,
    field: str,
    name: str,
    job_id: str,
    spec: ModelSpec,
    storage: Storage,
    policy: UrlPolicy,
    limits: InputLimits,
    scope: KeyScope,
    deadline: float,
    budget: DecodeBudget,
) -> tuple[MediaRef, ImageInfo | VideoInfo | AudioInfo]:
    if ref.url is None:
        return ref, _check(_read(storage, ref.key, scope), name, spec, limits, budget)[1]
    key = input_prefix(scope.tenant, job_id) + field
    if is_data_url(ref.url):
        data = _data_url_bytes(ref.url, limits.max_bytes)
        ext, info = _check(data, name, spec, limits, budget)
        storage.put(f"{key}.{ext}", data, _content_type(ext))
        return MediaRef(key=f"{key}.{ext}"), info
    with _download(ref.url, limits.max_bytes, deadline, policy) as (file, _digest):
        ext, info = _check(file, name, spec, limits, budget)
        storage.put_file(f"{key}.{ext}", file, _content_type(ext))
    return MediaRef(key=f"{key}.{ext}"), info


def _content_type(ext: str) -> str:
    return mimetypes.types_map.get(f".{ext}", "application/octet-stream")


# data:[<media type>][;parameters];base64,<data> (RFC 2397). The media type is not trusted: the
# bytes are decoded and checked as any input's are.
_DATA_URL = re.compile(r"^data:([^,]*),", re.IGNORECASE)


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The file a base64 data URL holds; a ``MediaError`` for one that is not base64, is not valid
    base64, or holds more than ``max_bytes`` (told from its length, before decoding it)."""
    head = _DATA_URL.match(url)
    if head is None or not head.group(1).lower().endswith(";base64"):
        raise MediaError("a data URL must be base64: data:<media type>;base64,<data>")
    encoded = url[head.end() :]
    if len(encoded) // 4 * 3 > max_bytes + 2:  # base64's length, padding aside
        raise MediaError(f"larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data URL is not valid base64") from None
    if len(data) > max_bytes:
        raise MediaError(f"larger than {max_bytes} bytes")
    return data


def _read(storage: Storage, key: str, scope: KeyScope) -> bytes:
    # Another tenant's key gets the words of a missing one, checked before the store is asked.
    missing = MediaError("no such object in the store; upload it first")
    if not scope.may_read(key):
        raise missing
    try:
        return storage.get(key)
    except ObjectNotFound:
        raise missing from None
    except (StorageError, ValueError) as exc:
        raise MediaError(f"cannot read {key!r}: {exc}") from None


def _check(
    data: bytes | BinaryIO, name: str, spec: ModelSpec, limits: InputLimits, budget: DecodeBudget
) -> tuple[str, ImageInfo | VideoInfo | AudioInfo]:
    """Decode and check ``data`` (bytes, or a file) as the media the field needs, a video within
    what is left of the request's ``budget``; return a file extension and what the check found."""
    if _size(data) > limits.max_bytes:
        raise MediaError(f"larger than {limits.max_bytes} bytes")
    if name in AUDIO_FIELDS:
        video = spec.video
        # Speech longer than the longest video the model makes would be cut.
        max_duration_s = video.max_frames / video.fps if video else 600.0
        info = check_audio(data, max_duration_s=max_duration_s)
        return {"mp3": "mp3", "flac": "flac"}.get(info.codec, "wav"), info
    if name in VIDEO_FIELDS:
        video = spec.video
        max_frames = video.max_frames if video else 1000
        max_duration_s = max_frames / video.fps if video else 60.0
        video_info = check_video(
            data,
            max_frames=max_frames,
            max_duration_s=max_duration_s,
            max_side=limits.video_max_side,
            budget=budget,
        )
        return "mp4", video_info
    image_info = check_image(data, max_pixels=limits.image_max_pixels, max_side=limits.image_max_side)
    return _EXTENSIONS.get(image_info.format.upper(), "img"), image_info


def upload(storage: Storage, data: bytes | BinaryIO, limits: InputLimits, tenant: str) -> dict[str, str]:
    """Store caller media (bytes, or a seekable file, streamed to the store from its start) under
    ``uploads/<tenant>/`` after checking it decodes; returns the ``{"key": ...}`` a request of the
    same tenant uses."""
    ext = _sniff(data, limits)
    key = upload_key(tenant, ext)
    content_type = _content_type(ext)
    if isinstance(data, bytes):
        storage.put(key, data, content_type)
    else:
        storage.put_file(key, data, content_type)
    return {"key": key}


def _size(data: bytes | BinaryIO) -> int:
    return len(data) if isinstance(data, bytes) else data.seek(0, io.SEEK_END)


def _sniff(data: bytes | BinaryIO, limits: InputLimits) -> str:
    if _size(data) > limits.max_bytes:
        raise InvalidRequest([FieldError("file", f"larger than {limits.max_bytes} bytes")])
    try:
        info = check_image(data, max_pixels=limits.image_max_pixels, max_side=limits.image_max_side)
        return _EXTENSIONS.get(info.format.upper(), "img")
    except MediaError:
        pass
    try:
        # Decoding stops at the most any model takes: a file of more frames is refused as soon
        # as its frame count passes that, not after decoding all of it.
        check_video(
            data,
            max_frames=_UPLOAD_MAX_FRAMES,
            max_duration_s=_UPLOAD_MAX_DURATION_S,
            max_side=limits.video_max_side,
            budget=DecodeBudget(limits.video_max_decode_pixels),
        )
        return "mp4"
    except DecodeBudgetError as exc:  # a video, too costly to decode: say so, not "not a video"
        raise InvalidRequest([FieldError("file", str(exc))]) from None
    except MediaError:
        pass
    try:
        info = check_audio(data, max_duration_s=_UPLOAD_MAX_DURATION_S)
        return {"mp3": "mp3", "flac": "flac"}.get(info.codec, "wav")
    except MediaError:
        pass
    try:
        # A LoRA: checked against its model when a request names it.
        read_header(data, max_header_bytes=limits.lora_max_header_bytes, max_tensors=limits.lora_max_tensors)
        return "safetensors"
    except LoraError as exc:
        raise InvalidRequest(
            [FieldError("file", f"not an image, video or audio file, nor a safetensors LoRA ({exc})")]
        ) from None

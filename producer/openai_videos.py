"""An OpenAI-compatible door: the Videos API over the fleet's text- and image-to-video jobs, so
the OpenAI SDKs' ``videos.create``, ``retrieve``, ``list``, ``download_content``, ``delete`` and
``create_and_poll`` work with ``base_url=<fleet>/v1`` and a fleet API key. ``retrieve``, ``list``,
``download_content`` and ``delete`` take every video job of the tenant: Animate's and S2V's,
made through ``POST /v1/jobs`` (their inputs are no OpenAI field), too; their ``seconds`` is
``"0"`` until made where the request left the length to its inputs.

The calls are OpenAI's, and asynchronous as OpenAI's are: ``POST /v1/videos`` queues a job as
``POST /v1/jobs`` does (``producer.openai_door``) and answers at once with the video (its id is
the job's); ``GET /v1/videos/{id}`` follows it (``queued``, ``in_progress`` with ``progress`` in
percent of the denoising steps, ``completed`` or ``failed``; ``openai-poll-after-ms`` says when to
ask again, ``FLEET_OPENAI_POLL_AFTER_MS``); ``GET /v1/videos/{id}/content`` streams the MP4.

    OpenAI field      fleet request
    model             a catalog model that makes videos (default FLEET_OPENAI_VIDEO_MODEL)
    prompt            prompt
    seconds           frames: seconds x the model's fps, to the nearest count the model makes
                      (4k+1 for Wan); none: the model's default
    size              "WxH": width, height, each rounded down to the model's multiple (OpenAI's
                      1280x720 is 1280x704 on Wan2.2-TI2V-5B); none: the model's default
    input_reference   image-to-video: an image file part, or {"image_url": an http(s) URL, which
                      the fleet fetches, or a base64 data URL}; stored with the job's inputs
                      (inputs/<tenant>/<job>/), and deleted with the video

The fleet's ``negative_prompt``, ``seed``, ``steps`` and ``guidance_scale`` may be added (the SDKs'
``extra_body``), and its ``webhook`` (the job's events, POSTed signed as for ``POST /v1/jobs``).
``file_id`` (the fleet has no Files API), remixes, edits, extensions and characters are refused,
as is any other field, with a 400 naming it. ``list`` takes ``order=desc`` (newest first, the
default) and ``order=asc``. ``content``'s
``variant=thumbnail`` (the first frame, WebP) and ``variant=spritesheet`` (16 frames in a grid,
JPEG) are made from the video when first asked for and kept beside it (``producer.video_previews``).
``DELETE`` deletes an ended video's files and record; a queued one is canceled and deleted, a
running one is canceled and answered 409 until it stops (at its next step).
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from producer.openai_door import Door, FleetFields, OpenAIError, Refused, documented, invalid, read_form
from producer.video_previews import PREVIEWS, preview
from routing.catalog import CATALOG, ModelSpec, TaskKind
from routing.errors import NotFound
from routing.io.storage import ObjectNotFound
from routing.jobs.keys import is_job_id
from routing.jobs.record import JobRecord, JobStatus
from routing.jobs.store import ORDERS, Cursor
from routing.schemas import data_url, is_data_url

VIDEOS = "/v1/videos"
# Fleet request fields as OpenAI names them, in an error's ``param``.
NAMES = {"width": "size", "height": "size", "frames": "seconds", "image": "input_reference"}
# The jobs this door makes (``videos.create``), and the ones it shows as videos: every kind a
# video model runs, so the SDKs follow, download and delete the Animate and S2V videos made
# through ``POST /v1/jobs`` too.
MADE = frozenset({TaskKind.TEXT_TO_VIDEO, TaskKind.IMAGE_TO_VIDEO})
SHOWN = frozenset(kind for spec in CATALOG.values() if spec.video is not None for kind in spec.task_kinds)
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
_CHUNK_BYTES = 1 << 20
_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "in_progress",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "failed",
}


def _seconds(value: Any) -> Any:
    """OpenAI's ``seconds`` is a string ("4"); a JSON number is taken too."""
    if isinstance(value, bool):
        raise ValueError("a number of seconds, as a string or a number")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError("a number of seconds, as a string or a number") from None
    return value


class ImageReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(default=None, description="an http(s) URL, or a base64 data URL")
    file_id: str | None = Field(default=None, description="refused: the fleet has no Files API")


class VideoCreate(FleetFields):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what to make")
    model: str | None = Field(default=None, description="a fleet model that makes videos (GET /v1/models)")
    seconds: Annotated[float | None, BeforeValidator(_seconds)] = Field(
        default=None, gt=0, le=3600, description="length; none: the model's"
    )
    size: str | None = Field(default=None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WxH")
    input_reference: ImageReference | None = Field(
        default=None, description="image-to-video: the first frame (a file part, or image_url)"
    )


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: int | None
    expires_at: int | None
    prompt: str
    seconds: str
    size: str
    error: VideoError | None
    remixed_from_video_id: None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


def add_routes(
    app: FastAPI,
    door: Door,
    *,
    tenant_of: Any,
    error_detail: type[BaseModel],
    fetching: Callable[[str, Callable[[], str]], Awaitable[str]],
) -> None:
    """The Videos routes on ``app``; ``fetching(tenant, submit)`` runs a submit that downloads
    its input, within the tenant's downloading submits."""
    client, settings = door.client, door.settings
    unknown = {"model": OpenAIError, "description": "no such video of the tenant's"}
    keyed: dict[int | str, dict[str, Any]] = {
        401: {"model": error_detail, "description": "no API key, or an unknown one"}
    }
    reference = {"input_reference": {"type": "string", "format": "binary"}}

    @app.post(
        VIDEOS,
        response_model=Video,
        responses={
            **keyed,
            400: {"model": OpenAIError, "description": "the request was refused; nothing was queued"},
            409: {"model": OpenAIError, "description": "the Idempotency-Key was used with another request"},
            413: {"model": error_detail, "description": "the body is over the limit"},
            429: {"model": OpenAIError, "description": "a tenant limit; retry after Retry-After seconds"},
            503: {"model": OpenAIError, "description": "the job store is unreachable"},
        },
        openapi_extra=documented(VideoCreate, "multipart/form-data", reference),
        tags=["OpenAI-compatible"],
    )
    async def create(request: Request, tenant: str = Depends(tenant_of)) -> Any:
        """OpenAI's ``videos.create``: a text- or image-to-video job with a fleet model (default
        FLEET_OPENAI_VIDEO_MODEL), answered at once; multipart (as the SDKs send it) or JSON."""
        try:
            # A reference image sent as a file or a data URL is read, checked and stored within
            # one of the tenant's upload slots.
            with door.reading_files(request, tenant):
                body, image_url = await _create_body(request)
                job = _request(body, body.model or settings.openai_video_model, image_url is not None)
                if image_url is not None:  # a data URL is stored with the job's inputs at submit
                    job["image"] = {"url": image_url}
                # An http(s) URL is fetched at submit, within the tenant's downloading submits.
                fetched = image_url is not None and not is_data_url(image_url)
                run = (lambda submit: fetching(tenant, submit)) if fetched else None
                job_id = await door.queue(job, tenant, request, run=run, webhook=body.webhook)
            return await run_in_threadpool(_video, client.get(job_id))
        except Refused as exc:
            return exc.answer()

    @app.get(
        VIDEOS,
        response_model=VideoList,
        responses={
            **keyed,
            400: {"model": OpenAIError, "description": "a refused query, or an unknown after"},
        },
        tags=["OpenAI-compatible"],
    )
    def list_videos(
        tenant: str = Depends(tenant_of),
        after: Annotated[
            str | None, Query(max_length=64, description="the last id of the page before")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        order: Annotated[
            str, Query(max_length=8, description="desc (newest first, the default) or asc (oldest first)")
        ] = "desc",
    ) -> Any:
        """OpenAI's ``videos.list``: the tenant's videos, newest first (``order=asc``: oldest
        first). One call reads at most
        FLEET_OPENAI_LIST_SCAN of the tenant's jobs looking for videos among the rest:
        ``has_more`` and ``last_id`` then say where to go on, though the page holds fewer than
        ``limit``."""
        try:
            if order not in ORDERS:
                raise Refused(
                    400, "order: desc (newest first) or asc (oldest first)", "invalid_request_error", "order"
                )
            cursor = str(_cursor(_own(after, tenant, "after", any_kind=True))) if after else None
            found: list[JobRecord] = []
            read: JobRecord | None = None  # the last job read: the next page starts after it
            left = settings.openai_list_scan
            more = True
            while more and len(found) < limit and left > 0:
                records, cursor = client.list(min(100, left), cursor, tenant=tenant, order=order)
                left -= max(1, len(records))
                more = cursor is not None
                for index, record in enumerate(records):
                    read = record
                    if TaskKind(record.kind) in SHOWN:
                        found.append(record)
                    if len(found) == limit:
                        more = more or index + 1 < len(records)
                        break
            videos = [_video(record) for record in found]
            return {
                "object": "list",
                "data": videos,
                "first_id": videos[0]["id"] if videos else None,
                "last_id": read.id if read is not None else None,
                "has_more": more,
            }
        except Refused as exc:
            return exc.answer()

    @app.get(
        VIDEOS + "/{video_id}",
        response_model=Video,
        responses={**keyed, 404: unknown},
        tags=["OpenAI-compatible"],
    )
    def retrieve(video_id: str, tenant: str = Depends(tenant_of)) -> Any:
        """OpenAI's ``videos.retrieve``: the video, with ``openai-poll-after-ms`` while it is made."""
        try:
            video = _video(_own(video_id, tenant))
        except Refused as exc:
            return exc.answer()
        headers = {}
        if video["status"] in ("queued", "in_progress"):
            headers["openai-poll-after-ms"] = str(settings.openai_poll_after_ms)
        return JSONResponse(video, headers=headers)

    @app.get(
        VIDEOS + "/{video_id}/content",
        response_class=StreamingResponse,
        responses={
            **keyed,
            200: {
                "content": {"video/mp4": {}, "image/webp": {}, "image/jpeg": {}},
                "description": "the MP4, its thumbnail (WebP) or its spritesheet (JPEG)",
            },
            400: {"model": OpenAIError, "description": "a variant the fleet does not make"},
            404: {"model": OpenAIError, "description": "no such video, or its file is no longer stored"},
            409: {"model": OpenAIError, "description": "the video is not completed"},
        },
        tags=["OpenAI-compatible"],
    )
    def content(
        video_id: str,
        tenant: str = Depends(tenant_of),
        variant: Annotated[
            str, Query(max_length=16, description="video (the MP4), thumbnail or spritesheet")
        ] = "video",
    ) -> Any:
        """OpenAI's ``videos.download_content``: the completed video's MP4, streamed from the
        store, or its thumbnail or spritesheet."""
        try:
            if variant != "video" and variant not in PREVIEWS:
                message = f"variant: video, thumbnail or spritesheet, not {variant!r}"
                raise Refused(400, message, "invalid_request_error", "variant")
            record = _own(video_id, tenant)
            if record.status is not JobStatus.SUCCEEDED:
                status = _STATUS[record.status]
                message = f"video {video_id} is {status}: it has no content"
                raise Refused(409, message, "invalid_request_error", code=f"video_{status}").final()
            output = record.outputs[0]
            if variant in PREVIEWS:
                data, made = preview(client.storage, output.key, variant)
                return Response(data, media_type=made.content_type)
            if not client.storage.exists(output.key):  # before the answer starts: a clear error
                raise ObjectNotFound(output.key)
        except Refused as exc:
            return exc.answer()
        except ObjectNotFound:
            message = (
                f"video {video_id}'s file is no longer stored "
                "(kept FLEET_RETENTION_OUTPUTS_DAYS, or deleted with the video)"
            )
            return Refused(404, message, "invalid_request_error", code="video_file_gone").final().answer()
        return StreamingResponse(
            _chunks(output.key, output.size_bytes),
            media_type=output.content_type,
            headers={"Content-Length": str(output.size_bytes)},
        )

    @app.delete(
        VIDEOS + "/{video_id}",
        response_model=VideoDeleted,
        responses={
            **keyed,
            404: unknown,
            409: {"model": OpenAIError, "description": "still running: canceled"},
            429: {
                "model": OpenAIError,
                "description": "the tenant's cancel rate; retry after Retry-After seconds",
            },
        },
        tags=["OpenAI-compatible"],
    )
    def delete(video_id: str, tenant: str = Depends(tenant_of)) -> Any:
        """OpenAI's ``videos.delete``: the video's file and record are deleted now (a queued one is
        canceled first; a running one is canceled, and answered 409 until it stops). A video the
        tenant deleted within ``FLEET_DELETED_JOB_TTL_S`` is answered deleted again (an SDK's
        retry after a lost answer); any other job of the tenant deleted then is as unknown as
        ever."""
        deleted = {"id": video_id, "object": "video.deleted", "deleted": True}
        try:
            record = _own(video_id, tenant)
        except Refused as exc:  # deleted by the tenant a moment ago is deleted still
            gone = client.deleted(video_id)
            return (
                deleted if gone and gone.tenant == tenant and TaskKind(gone.kind) in SHOWN else exc.answer()
            )
        try:
            if not record.status.is_terminal():
                door.rate("cancel", tenant)
                record = client.cancel(video_id)
            if not record.status.is_terminal():
                message = f"video {video_id} was in_progress: it is canceled and stops at its next step; delete it then"
                raise Refused(409, message, "invalid_request_error", code="video_in_progress").final()
            try:
                client.delete(video_id)  # ended: it stays so
            except NotFound:
                pass  # deleted meanwhile by another call
        except Refused as exc:
            return exc.answer()
        return deleted

    def _own(video_id: str, tenant: str, param: str | None = None, any_kind: bool = False) -> JobRecord:
        """The tenant's video ``video_id`` (with ``any_kind``, any of its jobs: a list's
        ``last_id``); another tenant's job, or a job of another kind, is as unknown as one that
        does not exist."""
        record = None
        if is_job_id(video_id):  # never cut into a key name: no job has it
            try:
                record = client.get(video_id)
            except NotFound:
                pass
        if record is None or record.tenant != tenant or not (any_kind or TaskKind(record.kind) in SHOWN):
            status = 400 if param else 404
            raise Refused(status, f"no video {video_id!r}", "invalid_request_error", param, "not_found")
        return record

    def _video(record: JobRecord) -> dict[str, Any]:
        spec = CATALOG.get(record.model)
        request = record.request
        output = record.outputs[0] if record.outputs else None
        if output is not None and output.frames and output.fps:
            seconds = output.frames / output.fps
        else:
            fps = spec.video.fps if spec and spec.video else 0
            seconds = (request.get("frames") or 0) / fps if fps else 0.0  # none: its inputs say, once made
        status = _STATUS[record.status]
        progress = 0
        if record.status is JobStatus.SUCCEEDED:
            progress = 100
        elif record.total_steps and record.stage is None:
            progress = min(99, 100 * record.step // record.total_steps)
        error = None
        if record.status is JobStatus.CANCELED:
            error = {"code": "canceled", "message": f"video {record.id} was canceled"}
        elif record.error is not None:
            error = {"code": record.error.type.value, "message": record.error.message}
        ended = record.finished_at if record.status.is_terminal() else None
        return {
            "id": record.id,
            "object": "video",
            "model": record.model,
            "status": status,
            "progress": progress,
            "created_at": int(record.created_at),
            "completed_at": int(ended) if ended else None,
            # The file goes with the record (FLEET_JOB_TTL_S after the end; the store keeps
            # outputs longer, FLEET_RETENTION_OUTPUTS_DAYS).
            "expires_at": int(ended + settings.job_ttl_s) if ended and output is not None else None,
            "prompt": request.get("prompt", ""),
            "seconds": f"{round(seconds, 2):g}",
            "size": f"{request.get('width')}x{request.get('height')}",
            "error": error,
            "remixed_from_video_id": None,
        }

    def _chunks(key: str, size_bytes: int) -> Iterator[bytes]:
        for offset in range(0, size_bytes, _CHUNK_BYTES):
            yield client.storage.get_range(key, offset, min(_CHUNK_BYTES, size_bytes - offset))

    async def _create_body(request: Request) -> tuple[VideoCreate, str | None]:
        """The call's fields and its reference image as a URL (None without one): an image file
        part becomes a base64 data URL, which the fleet stores with the job's inputs."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            fields, files = await read_form(request, frozenset({"input_reference"}), max_files=2)
            if len(files) > 1:
                raise Refused(400, "input_reference: one image", "invalid_request_error", "input_reference")
            data: dict[str, Any] = fields  # input_reference[image_url] read back into an object
            image = files[0] if files else None
        else:
            data, image = None, None
        try:  # a form's fields are strings, read as numbers; JSON's types are held to
            if data is not None:
                body = VideoCreate.model_validate(data)
            else:
                body = VideoCreate.model_validate_json(await request.body(), strict=True)
        except ValueError as exc:
            raise invalid(exc) from None
        reference = body.input_reference
        if reference is not None and image is not None:
            message = "input_reference: an image file or an object, not both"
            raise Refused(400, message, "invalid_request_error", "input_reference")
        if image is not None:
            return body, data_url(image)
        if reference is None:
            return body, None
        if reference.file_id is not None:
            message = "input_reference.file_id: the fleet has no Files API; send the image, or its image_url"
            raise Refused(400, message, "invalid_request_error", "input_reference")
        url = reference.image_url or ""
        if not (url.lower().startswith(("http://", "https://")) or is_data_url(url)):
            message = "input_reference.image_url: an http(s) URL or a base64 data:image/... URL"
            raise Refused(400, message, "invalid_request_error", "input_reference")
        return body, url


def _request(body: VideoCreate, model: str, with_image: bool) -> dict[str, Any]:
    """The fleet request of a create call: its kind, and its seconds and size in the model's terms."""
    spec = CATALOG.get(model)
    kind = TaskKind.IMAGE_TO_VIDEO if with_image or body.input_reference else TaskKind.TEXT_TO_VIDEO
    job: dict[str, Any] = {"model": model, "kind": kind.value, "prompt": body.prompt}
    job |= body.fleet_fields()
    if spec is None:
        return job  # the fleet's own check names the unknown model
    if spec.video is None or not MADE & set(spec.task_kinds):
        message = f"model: {model} does not make videos; see GET /v1/models"
        raise Refused(400, message, "invalid_request_error", "model")
    if kind not in spec.task_kinds:
        does = "an input_reference" if kind is TaskKind.TEXT_TO_VIDEO else "no input_reference"
        message = f"input_reference: {model} takes {does} ({', '.join(k.value for k in spec.task_kinds)})"
        raise Refused(400, message, "invalid_request_error", "input_reference")
    if body.seconds is not None:
        job["frames"] = _frames(body.seconds, spec)
    if body.size is not None:
        width, height = (int(side) for side in _SIZE.fullmatch(body.size).groups())  # the pattern holds
        step = spec.size.multiple_of
        job |= {"width": max(step, width // step * step), "height": max(step, height // step * step)}
    return job


def _frames(seconds: float, spec: ModelSpec) -> int:
    """The frame count nearest ``seconds`` that the model makes (k x frames_step + frames_offset)."""
    video = spec.video
    steps = max(1, round((seconds * video.fps - video.frames_offset) / video.frames_step))
    frames = steps * video.frames_step + video.frames_offset
    if frames > video.max_frames:
        longest = (video.max_frames - video.frames_offset) // video.frames_step * video.frames_step
        longest_s = math.floor((longest + video.frames_offset) / video.fps * 100) / 100
        message = (
            f"seconds: at most {longest_s:g} for {spec.key} "
            f"({longest + video.frames_offset} frames at {video.fps} fps)"
        )
        raise Refused(400, message, "invalid_request_error", "seconds")
    return frames


def _cursor(record: JobRecord) -> Cursor:
    """The fleet's list cursor just after ``record`` (``Client.list``)."""
    return Cursor(record.created_at, record.id)

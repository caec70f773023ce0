"""An OpenAI-compatible door: the Images API (``POST /v1/images/generations`` and
``POST /v1/images/edits``) over the fleet's jobs, so the OpenAI SDKs, and the tools built on them,
work with ``base_url=<fleet>/v1`` and a fleet API key.

The call is OpenAI's: one request, one answer with the images. It queues a job as ``POST /v1/jobs``
does (the same tenant, in-flight limit, submit rate and checks; priority ``normal``; an
``Idempotency-Key`` header is honoured, an edit's by its fields other than the images), holds the answer until the job ends, at most
``FLEET_OPENAI_WAIT_S`` (a ``Prefer: wait`` slot, ``FLEET_PREFER_WAITS_PER_*``), and answers
``{"created", "data": [{"url"} or {"b64_json"}], "size", "output_format"}``. A job still running
then is answered 408 naming it: it goes on, and ``GET /v1/jobs/{id}`` follows it.

    OpenAI field      fleet request
    model             a catalog model of the kind (default FLEET_OPENAI_IMAGE_MODEL,
                      FLEET_OPENAI_EDIT_MODEL)
    prompt            prompt
    n                 num_outputs (at most FLEET_MAX_NUM_OUTPUTS); an edit makes one
    size              "WxH": width, height; "auto" or none: the model's default
    response_format   url (presigned for FLEET_PRESIGN_EXPIRY_S) | b64_json
    output_format     png | jpeg | webp
    image, image[]    edits: the input images (1 to the model's most), stored as uploads
    user              accepted, and not used

Any other field (``quality``, ``style``, ``mask``, ``background``...) is refused with a 400 naming
it: the fleet does not do it. Errors are OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``, ``param`` naming the OpenAI field; an answer after which a retry would queue
the job again says ``x-should-retry: false``, which the OpenAI SDKs obey.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from producer.admission import Slots, SlotsTaken
from routing import tracing
from routing.errors import Conflict, ErrorType, FieldError, InvalidRequest, TooManyJobs, Unavailable
from routing.jobs.record import JobStatus
from routing.settings import Settings

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
# Fleet request fields as OpenAI names them, in an error's ``param``.
_PARAM = {"num_outputs": "n", "width": "size", "height": "size", "images": "image"}
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# A job's end, as the OpenAI status and error type a client expects for it.
_FAILED = {
    ErrorType.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorType.NO_PERSON_FOUND: (400, "invalid_request_error"),
    ErrorType.EXPIRED: (503, "server_error"),
}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what to make, or what to change")
    model: str | None = Field(default=None, description="a fleet model (GET /v1/models)")
    n: int = Field(default=1, ge=1, description="images to make")
    size: str | None = Field(
        default=None, pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$", description="WxH, or auto"
    )
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "webp"] | None = None
    user: str | None = Field(default=None, max_length=256, description="accepted, and not used")


class ImageGeneration(_Options):
    pass


class ImageEdit(_Options):
    image: list[bytes] = Field(description="the input images (image or image[] parts)")


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None


class ImagesOut(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: str


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class _Refused(Exception):
    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.headers: dict[str, str] = {}
        self.queued = False  # said after the job was queued: its inputs are the job's


def _error(exc: _Refused) -> JSONResponse:
    body = {"error": {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.code}}
    return JSONResponse(body, exc.status, exc.headers)


def _documented(model: type[BaseModel], media_type: str) -> dict[str, Any]:
    schema = model.model_json_schema()
    if media_type == "multipart/form-data":
        schema["properties"]["image"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


def add_routes(
    app: FastAPI,
    *,
    client: Any,
    settings: Settings,
    tenant_of: Callable[..., str],
    take_rate: Callable[[str, str], None],
    waits: Slots,
    wait_finished: Callable[[str, float], Awaitable[bool]],
    error_detail: type[BaseModel],
) -> None:
    """The two routes on ``app``, with the API's own tenant check, rates and wait slots."""
    responses: dict[int | str, dict[str, Any]] = {
        400: {"model": OpenAIError, "description": "the request was refused; nothing was queued"},
        401: {"model": error_detail, "description": "no API key, or an unknown one"},
        408: {
            "model": OpenAIError,
            "description": "the job had not ended after FLEET_OPENAI_WAIT_S; it goes on",
        },
        409: {"model": OpenAIError, "description": "the Idempotency-Key was used with another request"},
        413: {"model": error_detail, "description": "the body is over the limit"},
        429: {"model": OpenAIError, "description": "a tenant limit; retry after Retry-After seconds"},
        500: {"model": OpenAIError, "description": "the job failed"},
        503: {
            "model": OpenAIError,
            "description": "the job store is unreachable, or the job expired in its queue",
        },
    }

    @app.post(
        GENERATIONS,
        response_model=ImagesOut,
        responses=responses,
        openapi_extra=_documented(ImageGeneration, "application/json"),
        tags=["OpenAI-compatible"],
    )
    async def generations(request: Request, tenant: str = Depends(tenant_of)) -> Any:
        """OpenAI's ``images.generate``: text-to-image with a fleet model (default
        FLEET_OPENAI_IMAGE_MODEL), answered when the job ends."""
        try:
            try:
                body = ImageGeneration.model_validate(await request.json())
            except ValueError as exc:  # not JSON, or not the schema
                raise _invalid(exc) from None
            job = _request(body, body.model or settings.openai_image_model, "text-to-image")
            return await _run(job, body, tenant, request)
        except _Refused as exc:
            return _error(exc)

    @app.post(
        EDITS,
        response_model=ImagesOut,
        responses=responses,
        openapi_extra=_documented(ImageEdit, "multipart/form-data"),
        tags=["OpenAI-compatible"],
    )
    async def edits(request: Request, tenant: str = Depends(tenant_of)) -> Any:
        """OpenAI's ``images.edit``: an edit of one or more images with a fleet model (default
        FLEET_OPENAI_EDIT_MODEL), answered when the job ends. No ``mask``."""
        stored: list[str] = []
        try:
            body, files = await _edit_form(request)
            job = _request(body, body.model or settings.openai_edit_model, "edit")
            earlier = await run_in_threadpool(
                _earlier_edit, job, tenant, request.headers.get("idempotency-key")
            )
            if earlier is not None:  # a call made again (its answer lost): that job, no new images
                return await _answer_when_done(earlier, body, tenant)
            # The images are stored as the tenant's uploads, checked as POST /v1/uploads checks
            # them; a request refused after that leaves none of them behind.
            for data in files:
                stored.append(await run_in_threadpool(_upload, data, tenant))
            return await _run(job | {"images": [{"key": key} for key in stored]}, body, tenant, request)
        except _Refused as exc:
            if not exc.queued:  # refused: nothing queued, and nothing kept
                await run_in_threadpool(_delete, stored)
            return _error(exc)

    def _upload(data: bytes, tenant: str) -> str:
        try:
            return client.upload(data, tenant=tenant)["key"]
        except InvalidRequest as exc:
            raise _from_invalid(exc, "image") from None

    async def _run(job: dict[str, Any], body: _Options, tenant: str, request: Request) -> Any:
        """Queue ``job`` and answer when it ends."""
        slot = _take_slot(tenant)
        try:
            parent = request.headers.get("traceparent")
            with tracing.span(f"POST {request.url.path}", parent, tenant=tenant, model=job["model"]):
                job_id = await run_in_threadpool(_queue, job, tenant, request.headers.get("idempotency-key"))
            finished = await _wait(job_id)
        finally:
            slot.release()
        return await run_in_threadpool(_answer, job_id, finished, body.response_format)

    async def _answer_when_done(job_id: str, body: _Options, tenant: str) -> Any:
        """Answer with an earlier call's job when it ends, waited for as a new one is."""
        slot = _take_slot(tenant)
        try:
            finished = await _wait(job_id)
        finally:
            slot.release()
        return await run_in_threadpool(_answer, job_id, finished, body.response_format)

    def _take_slot(tenant: str) -> Any:
        try:
            return waits.take(tenant)
        except SlotsTaken as exc:
            raise _Refused(429, str(exc), "rate_limit_error") from None

    async def _wait(job_id: str) -> bool:
        try:
            return await wait_finished(job_id, settings.openai_wait_s)
        except Exception:  # the job is queued: the caller is told which, not an error of its own
            return False

    def _queue(job: dict[str, Any], tenant: str, idempotency_key: str | None) -> str:
        try:
            take_rate("submit", tenant)
            queued = client.submit(
                job,
                idempotency_key=f"{tenant}:openai:{idempotency_key}" if idempotency_key else None,
                tenant=tenant,
                max_in_flight=settings.tenants[tenant].max_in_flight,
            )
        except HTTPException as exc:  # the submit rate
            refused = _Refused(exc.status_code, str(exc.detail), "rate_limit_error")
            refused.headers = dict(exc.headers or {})
            raise refused from None
        except InvalidRequest as exc:
            raise _from_invalid(exc) from None
        except Unavailable as exc:
            raise _Refused(503, str(exc), "server_error") from None
        except TooManyJobs as exc:
            refused = _Refused(429, str(exc), "rate_limit_error")
            refused.headers = {"Retry-After": "10"}
            raise refused from None
        except Conflict as exc:
            refused = _Refused(409, str(exc), "invalid_request_error", code="idempotency_key_reused")
            refused.headers = {"x-should-retry": "false"}
            raise refused from None
        return queued.id

    def _earlier_edit(job: dict[str, Any], tenant: str, idempotency_key: str | None) -> str | None:
        """The job an edit's ``Idempotency-Key`` was used for: its images are stored under new
        keys each time they are sent, so an edit made again is matched by its other fields."""
        if not idempotency_key:
            return None
        job_id = client.job_of_idempotency_key(f"{tenant}:openai:{idempotency_key}")
        if job_id is None:
            return None
        asked = {name: value for name, value in job.items() if name != "kind"}
        kept = client.get(job_id).request
        if any(kept.get(name) != value for name, value in asked.items()):
            refused = _Refused(
                409,
                f"idempotency key {idempotency_key!r} was used for another request",
                "invalid_request_error",
                code="idempotency_key_reused",
            )
            refused.headers = {"x-should-retry": "false"}
            raise refused
        return job_id

    def _delete(keys: list[str]) -> None:
        for key in keys:
            client.storage.delete(key)

    def _answer(job_id: str, finished: bool, response_format: str) -> dict[str, Any]:
        record = client.get(job_id)
        if not finished or not record.status.is_terminal():
            refused = _Refused(
                408,
                f"job {job_id} has not ended after {settings.openai_wait_s:g} s (FLEET_OPENAI_WAIT_S); "
                f"it goes on: GET /v1/jobs/{job_id}",
                "timeout",
                code="job_running",
            )
            refused.headers = {"x-should-retry": "false", "Fleet-Job-Id": job_id}
            refused.queued = True
            raise refused
        if record.status is not JobStatus.SUCCEEDED:
            error = record.error
            status, kind = _FAILED.get(error.type, (500, "server_error")) if error else (409, "canceled")
            message = f"job {record.id} {record.status.value}" + (f": {error.message}" if error else "")
            refused = _Refused(status, message, kind, code=error.type.value if error else "canceled")
            refused.headers = {"x-should-retry": "false", "Fleet-Job-Id": record.id}
            refused.queued = True
            raise refused
        data = []
        for output in record.outputs:
            if response_format == "b64_json":
                data.append({"b64_json": base64.b64encode(client.storage.get(output.key)).decode()})
            else:
                data.append({"url": client.storage.url(output.key, settings.presign_expiry_s)})
        first = record.outputs[0]
        kind = first.content_type.removeprefix("image/")
        return {
            "created": int(record.created_at),
            "data": data,
            "size": f"{first.width}x{first.height}",
            "output_format": kind,
        }

    async def _edit_form(request: Request) -> tuple[ImageEdit, list[bytes]]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise _Refused(
                400, "send the edit as multipart/form-data, as the OpenAI SDKs do", "invalid_request_error"
            )
        try:
            form = await request.form(max_files=16, max_fields=32)
        except Exception as exc:  # a malformed multipart body
            raise _Refused(400, f"could not read the form: {exc}", "invalid_request_error") from None
        files: list[bytes] = []
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name in ("image", "image[]"):
                data = await value.read() if hasattr(value, "read") else str(value).encode()
                files.append(data)
            elif name in fields:
                raise _Refused(400, f"{name} is given twice", "invalid_request_error", name)
            else:
                fields[name] = (
                    value if isinstance(value, str) else (await value.read()).decode(errors="replace")
                )
        await form.close()
        if not files:
            raise _Refused(400, "image: at least one image file", "invalid_request_error", "image")
        try:
            body = ImageEdit.model_validate({**fields, "image": files})
        except ValueError as exc:
            raise _invalid(exc) from None
        return body, files


def _request(body: _Options, model: str, kind: str) -> dict[str, Any]:
    job: dict[str, Any] = {"model": model, "kind": kind, "prompt": body.prompt}
    if body.n != 1:
        if kind == "edit":  # the fleet's edit request makes one image
            raise _Refused(400, "n: an edit makes one image", "invalid_request_error", "n")
        job["num_outputs"] = body.n
    if body.size and body.size != "auto":
        width, height = _SIZE.fullmatch(body.size).groups()  # the schema's pattern holds
        job |= {"width": int(width), "height": int(height)}
    if body.output_format:
        job["output_format"] = body.output_format
    return job


def _invalid(exc: ValueError) -> _Refused:
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"{param}: not supported by this fleet"
        return _Refused(400, message, "invalid_request_error", param)
    return _Refused(400, f"the body is not valid JSON: {exc}", "invalid_request_error")


def _from_invalid(exc: InvalidRequest, param: str | None = None) -> _Refused:
    first: FieldError = exc.errors[0]
    name = param or _PARAM.get(first.field.split(".")[0], first.field)
    message = "; ".join(f"{_PARAM.get(e.field.split('.')[0], e.field)}: {e.message}" for e in exc.errors)
    return _Refused(400, message, "invalid_request_error", name)

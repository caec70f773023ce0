"""An OpenAI-compatible door: the Images API (``POST /v1/images/generations`` and
``POST /v1/images/edits``) over the fleet's jobs, so the OpenAI SDKs, and the tools built on them,
work with ``base_url=<fleet>/v1`` and a fleet API key.

The call is OpenAI's: one request, one answer with the images. It queues a job as ``POST /v1/jobs``
does (the same tenant, in-flight limit, submit rate and checks; priority ``normal``; an
``Idempotency-Key`` header is honoured, an edit's by its fields and the bytes of its images),
holds the answer until the job ends, at most
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
    image, image[]    edits: the input images (1 to the model's most), stored with the job's
                      inputs (inputs/<tenant>/<job>/), deleted with the job
    user              accepted, and not used

The fleet's ``negative_prompt``, ``seed``, ``steps`` and ``guidance_scale`` may be added (the SDKs'
``extra_body``), and its ``webhook`` (the job's events, POSTed signed as for ``POST /v1/jobs``).

Any other field (``quality``, ``style``, ``mask``, ``background``...) is refused with a 400 naming
it: the fleet does not do it. Errors are OpenAI's (``producer.openai_door``).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from producer.openai_door import Door, FleetFields, OpenAIError, Refused, documented, invalid, read_form
from routing.errors import ErrorType
from routing.jobs.record import JobStatus
from routing.schemas import data_url

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
# Fleet request fields as OpenAI names them, in an error's ``param``.
NAMES = {"num_outputs": "n", "width": "size", "height": "size", "images": "image"}
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# A job's end, as the OpenAI status and error type a client expects for it.
_FAILED = {
    ErrorType.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorType.NO_PERSON_FOUND: (400, "invalid_request_error"),
    ErrorType.EXPIRED: (503, "server_error"),
}


class _Options(FleetFields):
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


def add_routes(app: FastAPI, door: Door, *, tenant_of: Any, error_detail: type[BaseModel]) -> None:
    """The two routes on ``app``, with the API's own tenant check, rates and wait slots."""
    client, settings = door.client, door.settings
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
    images = {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}}

    @app.post(
        GENERATIONS,
        response_model=ImagesOut,
        responses=responses,
        openapi_extra=documented(ImageGeneration, "application/json"),
        tags=["OpenAI-compatible"],
    )
    async def generations(request: Request, tenant: str = Depends(tenant_of)) -> Any:
        """OpenAI's ``images.generate``: text-to-image with a fleet model (default
        FLEET_OPENAI_IMAGE_MODEL), answered when the job ends."""
        try:
            try:
                body = ImageGeneration.model_validate_json(await request.body(), strict=True)
            except ValueError as exc:  # not JSON, or not the schema
                raise invalid(exc) from None
            job = _request(body, body.model or settings.openai_image_model, "text-to-image")

            async def queue() -> tuple[str, str]:
                return await door.queue(job, tenant, request, webhook=body.webhook), body.response_format

            return await _run(queue, tenant)
        except Refused as exc:
            return exc.answer()

    @app.post(
        EDITS,
        response_model=ImagesOut,
        responses=responses,
        openapi_extra=documented(ImageEdit, "multipart/form-data", images),
        tags=["OpenAI-compatible"],
    )
    async def edits(request: Request, tenant: str = Depends(tenant_of)) -> Any:
        """OpenAI's ``images.edit``: an edit of one or more images with a fleet model (default
        FLEET_OPENAI_EDIT_MODEL), answered when the job ends. No ``mask``."""

        async def queue() -> tuple[str, str]:
            # The images are read within one of the tenant's upload slots, and nothing of them
            # outlives this call: the wait for the job holds none of them in memory. They go in
            # as base64 data URLs: checked at submit as any input is, and stored with the job's
            # inputs (inputs/<tenant>/<job>/), deleted with the job. A call made again with its
            # Idempotency-Key is matched by its fields and these bytes.
            with door.reading_files(request, tenant):
                body, files = await _edit_form(request)
                job = _request(body, body.model or settings.openai_edit_model, "edit")
                job["images"] = [{"url": data_url(data)} for data in files]
                return await door.queue(job, tenant, request, webhook=body.webhook), body.response_format

        try:
            return await _run(queue, tenant)
        except Refused as exc:
            return exc.answer()

    async def _run(queue: Callable[[], Awaitable[tuple[str, str]]], tenant: str) -> Any:
        """Queue a job (``queue`` answers its id and the call's response format) within one of
        the tenant's wait slots, and answer when it ends."""
        slot = door.take_slot(tenant)
        try:
            job_id, response_format = await queue()
            finished = await door.wait(job_id)
        finally:
            slot.release()
        return await run_in_threadpool(_answer, job_id, finished, response_format)

    def _answer(job_id: str, finished: bool, response_format: str) -> dict[str, Any]:
        record = client.get(job_id)
        if not finished or not record.status.is_terminal():
            refused = Refused(
                408,
                f"job {job_id} has not ended after {settings.openai_wait_s:g} s (FLEET_OPENAI_WAIT_S); "
                f"it goes on: GET /v1/jobs/{job_id}",
                "timeout",
                code="job_running",
            ).final()
            refused.headers["Fleet-Job-Id"] = job_id
            refused.queued = True
            raise refused
        if record.status is not JobStatus.SUCCEEDED:
            error = record.error
            status, kind = _FAILED.get(error.type, (500, "server_error")) if error else (409, "canceled")
            message = f"job {record.id} {record.status.value}" + (f": {error.message}" if error else "")
            refused = Refused(status, message, kind, code=error.type.value if error else "canceled").final()
            refused.headers["Fleet-Job-Id"] = record.id
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
            raise Refused(
                400, "send the edit as multipart/form-data, as the OpenAI SDKs do", "invalid_request_error"
            )
        fields, files = await read_form(request, frozenset({"image", "image[]"}), max_files=16)
        if not files:
            raise Refused(400, "image: at least one image file", "invalid_request_error", "image")
        try:
            body = ImageEdit.model_validate({**fields, "image": files})
        except ValueError as exc:
            raise invalid(exc) from None
        return body, files


def _request(body: _Options, model: str, kind: str) -> dict[str, Any]:
    job: dict[str, Any] = {"model": model, "kind": kind, "prompt": body.prompt, **body.fleet_fields()}
    if body.n != 1:
        if kind == "edit":  # the fleet's edit request makes one image
            raise Refused(400, "n: an edit makes one image", "invalid_request_error", "n")
        job["num_outputs"] = body.n
    if body.size and body.size != "auto":
        width, height = _SIZE.fullmatch(body.size).groups()  # the schema's pattern holds
        job |= {"width": int(width), "height": int(height)}
    if body.output_format:
        job["output_format"] = body.output_format
    return job

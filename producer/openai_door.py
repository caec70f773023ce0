"""What the OpenAI-compatible routes share (``producer.openai_images``, ``producer.openai_videos``):
OpenAI's error shape, and ``Door``, which queues a call's job as ``POST /v1/jobs`` does (the same
tenant, in-flight limit, submit rate and checks; priority ``normal``) and stores the files it
brings as the tenant's uploads.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, ``param`` naming
the OpenAI field; an answer after which a retry would queue the job again says
``x-should-retry: false``, which the OpenAI SDKs obey. An ``Idempotency-Key`` header is honoured
across both doors (``<tenant>:openai:<key>``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from producer.admission import Slots, SlotsTaken
from routing import tracing
from routing.errors import (
    Conflict,
    FieldError,
    InvalidRequest,
    NotReplicated,
    OverBudget,
    TooManyJobs,
    Unavailable,
)
from routing.jobs.events import Webhook
from routing.jobs.store import Created
from routing.settings import Settings


class FleetFields(BaseModel):
    """The fleet's own request fields a call may add to OpenAI's (the SDKs send them as
    ``extra_body``), checked by the fleet as in ``POST /v1/jobs``."""

    negative_prompt: str | None = Field(default=None, description="the fleet's: what to avoid")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="the fleet's: the seed")
    steps: int | None = Field(default=None, ge=1, le=10_000, description="the fleet's: denoising steps")
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0, description="the fleet's")
    webhook: Webhook | None = Field(
        default=None,
        description="the fleet's: where the job's events are POSTed, signed, as POST /v1/jobs takes it",
    )

    def fleet_fields(self) -> dict[str, Any]:
        """The request fields among them (``webhook`` is how the job is handled, not one)."""
        return self.model_dump(include=set(FleetFields.model_fields) - {"webhook"}, exclude_none=True)


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class Refused(Exception):
    """An OpenAI error answer: ``status``, ``kind`` (the error's ``type``), ``param``, ``code``."""

    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.headers: dict[str, str] = {}
        self.queued = False  # said after the job was queued: its inputs are the job's

    def final(self) -> Refused:
        """The same answer, marked as one a retry would not change (the SDKs obey it)."""
        self.headers["x-should-retry"] = "false"
        return self

    def answer(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, self.status, self.headers)


def invalid(exc: ValueError) -> Refused:
    """A body that is not JSON or not the door's schema, as OpenAI says it."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"{param}: not supported by this fleet"
        return Refused(400, message, "invalid_request_error", param)
    return Refused(400, f"the body is not valid JSON: {exc}", "invalid_request_error")


def from_invalid(exc: InvalidRequest, names: dict[str, str]) -> Refused:
    """The fleet's refusal of a request, naming the OpenAI fields (``names``: fleet field -> OpenAI
    field; the others keep their names)."""

    def named(field: str) -> str:
        return names.get(field.split(".")[0], field)

    first: FieldError = exc.errors[0]
    message = "; ".join(f"{named(e.field)}: {e.message}" for e in exc.errors)
    return Refused(400, message, "invalid_request_error", named(first.field))


def documented(
    model: type[BaseModel], media_type: str, files: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A route's request body in its OpenAPI document, ``files`` as binary parts. The model's
    own definitions (``$defs``: the webhook's) are written in place: a ``#/$defs`` reference
    means nothing inside the OpenAPI document."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inlined(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inlined(definitions[ref.removeprefix("#/$defs/")])
            return {key: inlined(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inlined(value) for value in node]
        return node

    schema = inlined(schema)
    schema["properties"] |= files or {}
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


async def read_form(
    request: Request, file_fields: frozenset[str], max_files: int
) -> tuple[dict[str, Any], list[bytes]]:
    """A multipart body's fields, each given once, and the contents of its ``file_fields`` parts
    in order (at most ``max_files``). The parts the OpenAI SDKs make of an object and a list are
    read back into them: ``name[key]`` into ``{"name": {"key": ...}}``, ``name[]`` and
    ``name[key][]`` into lists."""
    try:
        form = await request.form(max_files=max_files, max_fields=32)
    except Exception as exc:  # a malformed multipart body, or too many parts
        raise Refused(400, f"could not read the form: {exc}", "invalid_request_error") from None
    files: list[bytes] = []
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in file_fields:
            files.append(await value.read() if hasattr(value, "read") else str(value).encode())
            continue
        text = value if isinstance(value, str) else (await value.read()).decode(errors="replace")
        parts = _FORM_NAME.fullmatch(name)
        base, key, listed = parts.groups() if parts else (name, None, None)
        into = fields
        if key is not None:  # one level of object, as the SDKs send input_reference and webhook
            into = fields.setdefault(base, {})
            if not isinstance(into, dict):
                raise Refused(400, f"{base} is given twice", "invalid_request_error", base)
            base = key
        if listed:
            into.setdefault(base, []).append(text)
        elif base in into:
            raise Refused(400, f"{name} is given twice", "invalid_request_error", name)
        else:
            into[base] = text
    await form.close()
    return fields, files


# A form part's name: ``name``, ``name[]``, ``name[key]`` or ``name[key][]`` (any other name is
# taken whole, and refused by the schema as a field it does not know).
_FORM_NAME = re.compile(r"([^\[\]]+)(?:\[([^\[\]]+)\])?(\[\])?")


class Door:
    """Queues the jobs of OpenAI calls with the API's own rates and slots."""

    def __init__(
        self,
        *,
        client: Any,
        settings: Settings,
        take_rate: Callable[[str, str], None],
        waits: Slots,
        uploads: Slots,
        wait_finished: Callable[[str, float], Awaitable[bool]],
        names: dict[str, str],
    ):
        self.client = client
        self.settings = settings
        self.take_rate = take_rate
        self.waits = waits
        self.uploads = uploads
        self.wait_finished = wait_finished
        self.names = names  # fleet request field -> OpenAI field, in errors

    async def queue(
        self,
        job: dict[str, Any],
        tenant: str,
        request: Request,
        run: Callable[[Callable[[], str]], Awaitable[str]] | None = None,
        webhook: Webhook | None = None,
    ) -> str:
        """Queue ``job`` as ``tenant``, within the call's trace, its events sent to ``webhook``;
        ``run`` runs the blocking submit (default: on the shared threads)."""
        idempotency_key = request.headers.get("idempotency-key")
        parent = request.headers.get("traceparent")
        with tracing.span(f"POST {request.url.path}", parent, tenant=tenant, model=job["model"]):
            submit = partial(self._submit, job, tenant, idempotency_key, webhook)
            try:
                return await (run(submit) if run else run_in_threadpool(submit))
            except SlotsTaken as exc:  # the tenant's downloading submits
                refused = Refused(429, str(exc), "rate_limit_error")
                refused.headers = {"Retry-After": str(exc.retry_after_s)}
                raise refused from None

    def rate(self, action: str, tenant: str) -> None:
        """Count one of the tenant's ``action`` (submit, cancel) in its window, or refuse it."""
        try:
            self.take_rate(action, tenant)
        except HTTPException as exc:
            refused = Refused(exc.status_code, str(exc.detail), "rate_limit_error")
            refused.headers = dict(exc.headers or {})
            raise refused from None

    def _submit(
        self, job: dict[str, Any], tenant: str, idempotency_key: str | None, webhook: Webhook | None
    ) -> str:
        self.rate("submit", tenant)
        try:
            queued = self.client.submit(
                job,
                idempotency_key=self._idempotency(tenant, idempotency_key),
                webhook=webhook,
                tenant=tenant,
                max_in_flight=self.settings.tenants[tenant].max_in_flight,
                gpu_s_per_month=self.settings.tenants[tenant].gpu_s_per_month,
            )
        except InvalidRequest as exc:
            raise from_invalid(exc, self.names) from None
        except NotReplicated as exc:
            # Taken by the master, which may keep it: its files are the job's, and a call made
            # again with its key is matched by them.
            refused = _unavailable(exc)
            refused.queued = any(outcome is Created.CREATED for outcome, _ in exc.outcomes)
            raise refused from None
        except Unavailable as exc:
            raise _unavailable(exc) from None
        except TooManyJobs as exc:
            refused = Refused(429, str(exc), "rate_limit_error")
            refused.headers = {"Retry-After": "10"}
            raise refused from None
        except OverBudget as exc:  # OpenAI's answer to a spent quota; its SDKs are told not to retry
            refused = Refused(429, str(exc), "insufficient_quota", code="insufficient_quota")
            refused.headers = {"Retry-After": str(exc.retry_after_s())}
            raise refused.final() from None
        except Conflict as exc:
            raise Refused(
                409, str(exc), "invalid_request_error", code="idempotency_key_reused"
            ).final() from None
        return queued.id

    @staticmethod
    def _idempotency(tenant: str, idempotency_key: str | None) -> str | None:
        return f"{tenant}:openai:{idempotency_key}" if idempotency_key else None

    def take_slot(self, tenant: str) -> Any:
        """One of the tenant's ``Prefer: wait`` slots, for a call that waits for its job."""
        try:
            return self.waits.take(tenant)
        except SlotsTaken as exc:
            raise Refused(429, str(exc), "rate_limit_error") from None

    @contextmanager
    def reading_files(self, request: Request, tenant: str) -> Iterator[None]:
        """For a call whose body may carry files (multipart, or past ``FLEET_MAX_JSON_BODY_BYTES``:
        a data URL), one of the tenant's upload slots (``FLEET_MAX_CONCURRENT_UPLOADS``) while the
        block reads, checks and stores them: files held in memory are bounded per tenant as its
        uploads are. A 429 with ``Retry-After`` when the tenant holds all its slots."""
        length = request.headers.get("content-length", "")
        small = length.isdigit() and int(length) <= self.settings.max_json_body_bytes
        if small and not request.headers.get("content-type", "").startswith("multipart/"):
            yield
            return
        try:
            slot = self.uploads.take(tenant)
        except SlotsTaken as exc:
            refused = Refused(429, str(exc), "rate_limit_error")
            refused.headers = {"Retry-After": str(exc.retry_after_s)}
            raise refused from None
        try:
            yield
        finally:
            slot.release()

    async def wait(self, job_id: str) -> bool:
        """Whether the job ended within ``FLEET_OPENAI_WAIT_S``."""
        try:
            return await self.wait_finished(job_id, self.settings.openai_wait_s)
        except Exception:  # the job is queued: the caller is told which, not an error of its own
            return False


def _unavailable(exc: Unavailable) -> Refused:
    """The store unreachable, or its replicas short of a submit: a 503 to retry, as the fleet's
    own routes answer it (the OpenAI SDKs retry it, after ``Retry-After``)."""
    refused = Refused(503, str(exc), "server_error")
    refused.headers = {"Retry-After": "5"}
    return refused

"""The HTTP API backends in any language use: ``uvicorn producer.api:app``.

Every route but ``/healthz`` takes ``Authorization: Bearer <api key>``; the key names the tenant
(``FLEET_TENANTS``, or a key the tenant made: ``producer.api_keys``), and a tenant sees only its own jobs (anything else is a 404, the same as a job
that does not exist) and names only its own stored files (any other key reads as a missing one).
Errors are JSON: ``{"errors": [{"field", "message"}]}`` for a refused request (422),
``{"detail": "..."}`` otherwise. The OpenAPI document is at ``/openapi.json``.
"""

import contextlib
import datetime as dt
import hmac
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, start_http_server
from pydantic import BaseModel, Field, create_model
from redis import RedisError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer import openai_images, openai_videos
from producer.admission import RateLimits, Slots, SlotsTaken
from producer.api_keys import MAX_LABEL, is_managed
from producer.body_limits import KEY_TENANT, BodyLimits
from producer.client import Client
from producer.events import EVENT_ID, JobEvents, prefer_wait_s
from producer.inputs import fetches
from producer.metrics import FleetCollector
from producer.openai_door import Door, OpenAIError, Refused
from routing import tracing
from routing.catalog import CATALOG, ModelSpec, Variant
from routing.classes import Priority, VramClass, consumed_queues
from routing.errors import (
    Conflict,
    ErrorType,
    FieldError,
    InvalidRequest,
    NotFound,
    OverBudget,
    TooManyJobs,
    Unavailable,
    field_error,
)
from routing.jobs import webhook_log as webhooks
from routing.jobs.eta import Fleet, estimate, read_fleet
from routing.jobs.events import Webhook
from routing.jobs.expiry import ExpirySweep
from routing.jobs.keys import is_job_id
from routing.jobs.record import JobRecord, JobView, Output
from routing.schemas import REQUEST_TYPES
from routing.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Connections of the async Redis pool beyond the streams and waits it serves: their short reads
# (a job's tenant, its status) between blocking ones.
_SPARE_CONNECTIONS = 16


class _SubmitOptions(BaseModel):
    priority: Priority = Priority.NORMAL
    webhook: Webhook | None = None


# One body schema per task kind: the generation request plus how to handle the job. "kind" picks
# the schema (it is required here, unlike in the SDK, so the OpenAPI document can say which).
_SUBMISSIONS = [
    create_model(
        f"{request_type.__name__.removesuffix('Request')}Submission",
        __base__=(request_type, _SubmitOptions),
        kind=(Literal[kind], Field(description="the task kind; picks this schema")),
    )
    for kind, request_type in REQUEST_TYPES.items()
]
Submission = Annotated[
    _SUBMISSIONS[0] | _SUBMISSIONS[1] | _SUBMISSIONS[2] | _SUBMISSIONS[3] | _SUBMISSIONS[4] | _SUBMISSIONS[5],
    Field(discriminator="kind"),
]
assert len(_SUBMISSIONS) == 6
_KINDS = [k.value for k in REQUEST_TYPES]


class ErrorField(BaseModel):
    field: str
    message: str


class ErrorList(BaseModel):
    """A refused request: every offending field, named."""

    errors: list[ErrorField]


class ErrorDetail(BaseModel):
    detail: str


# A day in a query: ISO 8601's calendar date only (a bare number is not a day).
_DATE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"


def _day(field: str, text: str | None) -> dt.date | None:
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest([FieldError(field, f"not a calendar day: {text!r}")]) from None


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {
        401: "no API key, or an unknown one",
        404: "no such job or key, or not the tenant's",
        409: "the Idempotency-Key was used with another body; or the tenant has as many keys as it may",
        422: "the request was refused; nothing was queued",
        413: "the body is over the limit (FLEET_MAX_JSON_BODY_BYTES, uploads FLEET_MAX_INPUT_BYTES)",
        402: "the tenant's jobs this UTC month have used its GPU budget (gpu_s_per_month in FLEET_TENANTS); "
        "nothing was queued; Retry-After: the seconds until the next month",
        429: "the tenant has as many unfinished jobs, submits downloading, uploads or open streams, or made "
        "as many of these calls in the window, as it may; retry after Retry-After seconds",
        503: "the job store is unreachable; nothing was queued",
    }
    return {
        code: {"model": ErrorList if code == 422 else ErrorDetail, "description": what[code]}
        for code in codes
    }


class Progress(BaseModel):
    step: int
    total: int
    stage: str | None = Field(
        default=None,
        description="what step of total counts: null for denoising steps; preprocess.detect, "
        "preprocess.pose, preprocess.mask and preprocess.retarget (frames) or preprocess.encode "
        "(videos) while Animate's preprocessing runs",
    )


class ErrorOut(BaseModel):
    type: ErrorType = Field(description="why the job failed")
    exception: str = Field(description="the raised exception's class name, '' when none was raised")
    message: str
    where: str = Field(description="the exception as Python prints it, '' when none was raised")


class JobOut(BaseModel):
    id: str
    model: str
    kind: str
    status: str
    priority: str
    attempt: int
    progress: Progress
    queue: str
    queue_position: int | None = Field(description="jobs ahead in line, while queued")
    eta_s: float | None = Field(description="seconds until it should finish, from measured run times")
    outputs: list[Output]
    error: ErrorOut | None
    created_at: float
    updated_at: float = Field(description="when the record last changed (a state change or a step)")
    started_at: float | None
    finished_at: float | None
    timings: dict[str, float]
    webhook: Webhook | None
    request: dict[str, Any]


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


class Upload(BaseModel):
    key: str


class NewKey(BaseModel):
    label: str = Field(default="", max_length=MAX_LABEL, description="what the key is for, as lists show it")


class KeyOut(BaseModel):
    id: str = Field(description="names the key in lists and DELETE /v1/keys/{key_id}")
    label: str
    created_at: float


class CreatedKey(KeyOut):
    key: str = Field(description="the API key itself: shown once, here; the fleet keeps only its SHA-256")


class KeyList(BaseModel):
    keys: list[KeyOut]


class UsageRowOut(BaseModel):
    date: dt.date = Field(description="the UTC day the jobs ended on")
    model: str
    vram_class: str = Field(description="the class the jobs ended on (after any escalation)")
    status: str = Field(description="how they ended: succeeded, failed or canceled")
    jobs: int
    gpu_s: float = Field(description="GPU-seconds: held_s times the class's GPUs (8 on h100x8)")
    held_s: float = Field(
        description="seconds the attempts that ended the jobs held their worker, claim to the end "
        "of generation, less a cold model load; retries the fleet caused are not counted"
    )
    outputs: int
    output_bytes: int
    video_s: float = Field(description="seconds of video among the outputs")


class UsageTotalsOut(BaseModel):
    jobs: int
    gpu_s: float
    outputs: int
    output_bytes: int
    video_s: float


class UsageOut(BaseModel):
    tenant: str
    start: dt.date
    end: dt.date
    rows: list[UsageRowOut] = Field(description="one per day, model, class and end; days with none have none")
    totals: UsageTotalsOut
    gpu_s_per_month: float | None = Field(
        description="the tenant's GPU budget for a UTC month (gpu_s_per_month in FLEET_TENANTS), which "
        "the month to date (the default query) counts against; null: none"
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    client = Client(settings)
    keys_to_tenant = [
        (key.get_secret_value().encode(), name)
        for name, tenant in settings.tenants.items()
        for key in tenant.api_keys
    ]
    registry = CollectorRegistry()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        tracing.setup("fleet-api", settings.otlp_endpoint)
        # Metrics read the whole fleet and carry no auth: never on the port tenants reach.
        server = None
        if settings.metrics_port is not None:
            server, _ = start_http_server(settings.metrics_port, settings.metrics_address, registry)
        # Jobs on a class with no worker expire here too: the API is always up (a thread, off
        # the event loop).
        stop_expiry = ExpirySweep(
            client.store, settings.max_wait_s, settings.expiry_sweep_interval_s, settings.max_run_s
        ).start()
        try:
            yield
        finally:
            stop_expiry.set()
            tracing.shutdown()
            if server is not None:
                server.shutdown()
                server.server_close()

    app = FastAPI(title="GPU fleet", version="1", description=__doc__, lifespan=lifespan)
    app.state.client = client

    bearer = HTTPBearer(auto_error=False, description="an API key of your tenant")

    def tenant_of(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None
    ) -> str:
        key = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
        if not key:
            raise HTTPException(401, "send Authorization: Bearer <api key>", {"WWW-Authenticate": "Bearer"})
        checked, tenant = getattr(request.state, KEY_TENANT, ("", ""))
        if tenant and hmac.compare_digest(checked.encode(), key.encode()):
            return tenant  # looked up for this request already, by BodyLimits
        found = tenant_for_key(key)
        if found is None:
            raise HTTPException(401, "unknown API key", {"WWW-Authenticate": "Bearer"})
        return found

    def tenant_for_key(key: str) -> str | None:
        found = None
        for known, name in keys_to_tenant:  # compare every key, in constant time each
            if hmac.compare_digest(known, key.encode()):
                found = name
        if found is None and is_managed(key):
            # A key the tenant made (producer/api_keys.py), looked up by its digest on every
            # request: a revoked one is refused from the next on. Its tenant must still be set.
            found = client.tenant_of_key(key)
        return found

    async def key_tenant(key: str) -> str | None:
        if not is_managed(key):  # no Redis call for a key that cannot be a managed one
            return tenant_for_key(key)
        return await run_in_threadpool(tenant_for_key, key)

    # Bodies are capped, and refused without a key, before FastAPI reads them (producer/body_limits.py).
    app.add_middleware(
        BodyLimits,
        tenant_of_key=key_tenant,
        json_max_bytes=settings.max_json_body_bytes,
        upload_max_bytes=settings.max_input_bytes,
        # An OpenAI edit carries its images in the body, an OpenAI video its reference image (a
        # file part or a data URL): each at most FLEET_MAX_INPUT_BYTES.
        upload_paths=frozenset({"/v1/uploads", openai_images.EDITS, openai_videos.VIDEOS}),
    )

    Tenant = Annotated[str, Depends(tenant_of)]

    rates = RateLimits(
        client.store.client,
        client.keys,
        settings.rate_window_s,
        {"submit": settings.submits_per_tenant, "cancel": settings.cancels_per_tenant},
    )

    def take_rate(action: str, tenant: str) -> None:
        wait_s = rates.take(action, tenant)
        if wait_s is not None:
            detail = f"too many {action}s; tenant {tenant!r} may make {rates.limits[action]} every {rates.window_s} s"
            raise HTTPException(429, detail, {"Retry-After": str(wait_s)})

    def own_job(job_id: str, tenant: str) -> JobRecord:
        if not is_job_id(job_id):  # never cut into a key name: no job has it
            raise HTTPException(404, f"no job {job_id}")
        try:
            record = client.get(job_id)
        except NotFound:
            record = None
        if record is None or record.tenant != tenant:
            raise HTTPException(404, f"no job {job_id}")
        return record

    def job_out(record: JobRecord, fleet: Fleet | None = None) -> dict[str, Any]:
        # The one JSON shape of a job (routing.jobs.record.JobView); JobOut only documents it.
        expiry = settings.presign_expiry_s
        guess = estimate(client.store.client, client.keys, record, fleet)
        outputs = [o.with_url(client.storage.url(o.key, expiry)) for o in record.outputs]
        return JobView.of(record, queue_position=guess.position, eta_s=guess.eta_s, outputs=outputs).to_json()

    @app.exception_handler(SlotsTaken)
    def slots_taken(_request: Request, exc: SlotsTaken) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 429, {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(InvalidRequest)
    def invalid(_request: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse({"errors": [{"field": e.field, "message": e.message} for e in exc.errors]}, 422)

    @app.exception_handler(RequestValidationError)
    def malformed(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(_request, InvalidRequest([field_error(e, _KINDS) for e in exc.errors()]))

    @app.exception_handler(StarletteHTTPException)
    def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # A body that is not JSON at all is a refused request like any other: same status, same
        # error list, so clients handle one shape.
        if exc.status_code == 400:
            return invalid(_request, InvalidRequest([FieldError("request", "the body is not valid JSON")]))
        return JSONResponse({"detail": exc.detail}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Unavailable)
    def unavailable(_request: Request, exc: Unavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503, {"Retry-After": "5"})

    streams = Slots(
        settings.event_streams_per_tenant,
        settings.event_streams_per_api,
        "open event streams",
        "FLEET_EVENT_STREAMS_PER_TENANT, FLEET_EVENT_STREAMS_PER_API",
    )
    waits = Slots(
        settings.prefer_waits_per_tenant,
        settings.prefer_waits_per_api,
        "Prefer: wait submits",
        "FLEET_PREFER_WAITS_PER_TENANT, FLEET_PREFER_WAITS_PER_API",
    )
    live = JobEvents(
        settings,
        client.keys,
        settings.events_keepalive_s,
        max_connections=streams.total + waits.total + _SPARE_CONNECTIONS,
    )
    # Submits that download run on threads of their own, a few per tenant: however slowly their
    # URLs answer, the shared threads stay free for everyone's other requests.
    fetching = Slots(settings.max_fetching_submits, None, "submits downloading", "FLEET_MAX_FETCHING_SUBMITS")
    fetch_threads = anyio.CapacityLimiter(settings.api_fetch_threads)
    uploading = Slots(settings.max_concurrent_uploads, None, "uploads", "FLEET_MAX_CONCURRENT_UPLOADS")
    health_threads = anyio.CapacityLimiter(2)

    async def fetching_submit(tenant: str, submit: Callable[[], str]) -> str:
        """Run a submit that downloads its inputs within the tenant's downloading submits."""
        with fetching.holding(tenant):
            return await anyio.to_thread.run_sync(submit, limiter=fetch_threads)

    app.router.on_shutdown.append(live.close)

    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=JobOut,
        responses={
            200: {"model": JobOut, "description": "the earlier job of this Idempotency-Key and body"},
            202: {"model": JobOut, "description": "with Prefer: wait=N, the job had not ended after N s"},
            **_responses(401, 402, 409, 413, 422, 429, 503),
        },
    )
    async def submit(
        body: Submission,
        tenant: Tenant,
        response: Response,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
        prefer: Annotated[str | None, Header(max_length=255)] = None,
        traceparent: Annotated[
            str | None,
            Header(max_length=255, description="W3C trace context: the job's spans join the caller's trace"),
        ] = None,
    ) -> dict[str, Any]:
        """Queue a job. The same ``Idempotency-Key`` and body return the same job (200); the
        same key with another body is a 409.

        ``Prefer: wait=N`` (N up to ``FLEET_MAX_PREFER_WAIT_S``) holds the response until the job
        ends, at most N seconds: an ended job comes back whole (outputs included) with 201 (200
        for an earlier job), one still queued or running with 202."""
        wait_s = prefer_wait_s(prefer, settings.max_prefer_wait_s)
        allowed = settings.tenants[tenant].priorities
        if body.priority not in allowed:
            names = ", ".join(p.value for p in allowed)
            message = f"tenant {tenant!r} may use priorities {names} (got {body.priority.value!r})"
            raise InvalidRequest([FieldError("priority", message)])
        # A wait's slot is taken before anything is queued: refused, nothing is.
        slot = waits.take(tenant) if wait_s else None
        try:
            await run_in_threadpool(take_rate, "submit", tenant)
            queue = partial(queue_job, body, tenant, response, idempotency_key)
            # The submit's span (routing.tracing): the job's record keeps it, its runs are under it.
            with tracing.span("POST /v1/jobs", traceparent, tenant=tenant, model=body.model):
                if fetches(body):
                    job_id = await fetching_submit(tenant, queue)
                else:
                    job_id = await run_in_threadpool(queue)
            if wait_s:
                response.headers["Preference-Applied"] = f"wait={wait_s}"
                try:
                    finished = await live.wait_finished(job_id, wait_s)
                except RedisError:
                    # The job is queued: the caller gets it, not an error, and follows it later.
                    log.warning("waiting for job %s failed; answering 202", job_id, exc_info=True)
                    finished = False
                if not finished:
                    response.status_code = 202
        finally:
            if slot is not None:
                slot.release()
        return await run_in_threadpool(lambda: job_out(client.get(job_id)))

    door = partial(
        Door,
        client=client,
        settings=settings,
        take_rate=take_rate,
        waits=waits,
        uploads=uploading,
        wait_finished=live.wait_finished,
    )
    openai_images.add_routes(
        app, door(names=openai_images.NAMES), tenant_of=tenant_of, error_detail=ErrorDetail
    )
    openai_videos.add_routes(
        app,
        door(names=openai_videos.NAMES),
        tenant_of=tenant_of,
        error_detail=ErrorDetail,
        fetching=fetching_submit,
    )

    def queue_job(body: BaseModel, tenant: str, response: Response, idempotency_key: str | None) -> str:
        request = body.model_dump(mode="json", exclude={"priority", "webhook"}, exclude_none=True)
        limits = settings.tenants[tenant]
        try:
            job = client.submit(
                request,
                idempotency_key=f"{tenant}:{idempotency_key}" if idempotency_key else None,
                priority=body.priority,
                webhook=body.webhook,
                tenant=tenant,
                max_in_flight=limits.max_in_flight,
                gpu_s_per_month=limits.gpu_s_per_month,
            )
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        except TooManyJobs as exc:
            raise HTTPException(429, str(exc), {"Retry-After": "10"}) from None
        except OverBudget as exc:
            raise HTTPException(402, str(exc), {"Retry-After": str(exc.retry_after_s())}) from None
        if not job.created:
            response.status_code = 200  # the earlier job, not a new one
        return job.id

    @app.get(
        "/v1/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
                "description": "Server-Sent Events (producer/events.py): queued, started, progress, "
                "succeeded, failed, canceled; the stream ends after the terminal event",
            },
            **_responses(401, 404, 422, 429),
        },
    )
    async def job_events(
        job_id: str,
        tenant: Tenant,
        last_event_id: Annotated[str | None, Header(max_length=41, pattern=EVENT_ID.pattern)] = None,
    ) -> StreamingResponse:
        """The job's events as they happen. Reconnect with ``Last-Event-ID`` (the last ``id:``
        received) to get every later event once."""
        if not is_job_id(job_id):
            raise HTTPException(404, f"no job {job_id}")
        slot = streams.take(tenant)
        try:
            if await live.tenant_of(job_id) != tenant:
                raise HTTPException(404, f"no job {job_id}")
        except BaseException:
            slot.release()
            raise

        async def events() -> AsyncIterator[str]:
            try:
                async for text in live.sse(job_id, last_event_id or "0-0"):
                    yield text
            finally:  # ended, or the client went away
                slot.release()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(slot.release),  # a stream never started ends here too
        )

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=_responses(401, 404, 422))
    def status(job_id: str, tenant: Tenant) -> dict[str, Any]:
        return job_out(own_job(job_id, tenant))

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobOut,
        responses=_responses(401, 404, 422, 429)
        | {
            204: {"description": "with purge=true: the ended job and its files are deleted"},
            409: {"model": ErrorDetail, "description": "purge=true on a job that has not ended"},
        },
    )
    def cancel(
        job_id: str,
        tenant: Tenant,
        purge: Annotated[
            bool, Query(description="delete the ended job now: its files, then its record (204)")
        ] = False,
    ) -> Any:
        """Cancel: a queued job never runs; a running one stops at its next step. A finished job
        is returned as it is. With ``purge=true``, an ended job is deleted now rather than at its
        TTL: every file of its runs and the copies of the media it was given by URL, then its
        record, events, webhook log and idempotency key
        (204; a job not ended is a 409: cancel it first; a job the tenant deleted within
        ``FLEET_DELETED_JOB_TTL_S`` is 204 again). Both are rationed per tenant
        (``FLEET_CANCELS_PER_TENANT`` in windows of ``FLEET_RATE_WINDOW_S``)."""
        take_rate("cancel", tenant)
        try:
            own_job(job_id, tenant)
        except HTTPException:
            if purge and (deleted := client.deleted(job_id)) and deleted.tenant == tenant:
                return Response(status_code=204)  # deleted already: a repeat (a retry) is answered alike
            raise
        if not purge:
            return job_out(client.cancel(job_id))
        try:
            client.delete(job_id)
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        except NotFound:  # deleted meanwhile by another call: gone, as asked
            pass
        return Response(status_code=204)

    @app.get("/v1/jobs/{job_id}/webhooks", responses=_responses(401, 404, 422))
    def webhook_deliveries(job_id: str, tenant: Tenant) -> dict[str, Any]:
        """Every delivery attempt of the job's webhook events, oldest first: status codes,
        errors, times, and what became of each (delivered, retrying, failed, disabled, refused)."""
        own_job(job_id, tenant)
        return {"deliveries": webhooks.delivery_log(client.store.client, client.keys, job_id)}

    @app.post(
        "/v1/jobs/{job_id}/webhooks/{event_id}/replay",
        status_code=202,
        responses=_responses(401, 404, 422)
        | {429: {"model": ErrorDetail, "description": "too many replays; retry after Retry-After seconds"}},
    )
    def replay_webhook(job_id: str, event_id: str, tenant: Tenant) -> dict[str, str]:
        """Deliver an event again, with its original webhook-id. An endpoint that a 410 disabled
        is enabled again: replaying is how a tenant says it is back. Replays are rationed per job
        (``FLEET_REPLAY_PER_JOB``) and per tenant (``FLEET_REPLAY_PER_TENANT``) in windows of
        ``FLEET_REPLAY_WINDOW_S``."""
        record = own_job(job_id, tenant)
        entries = [
            e
            for e in webhooks.delivery_log(client.store.client, client.keys, job_id)
            if e["event_id"] == event_id
        ]
        if not entries:
            raise HTTPException(404, f"no delivery of event {event_id} for job {job_id}")
        wait_s = webhooks.take_replay(
            client.store.client,
            client.keys,
            tenant,
            job_id,
            per_job=settings.replay_per_job,
            per_tenant=settings.replay_per_tenant,
            window_s=settings.replay_window_s,
        )
        if wait_s is not None:
            raise HTTPException(429, "too many webhook replays", {"Retry-After": str(wait_s)})
        if record.webhook is not None:
            webhooks.enable_url(client.store.client, client.keys, tenant, record.webhook.url)
        entry = entries[0]
        webhooks.replay(
            client.store.messages, client.store.client, job_id, event_id, entry["type"], entry["event_at"]
        )
        return {"status": "queued", "event_id": event_id}

    @app.get("/v1/jobs", response_model=JobPage, responses=_responses(401, 422))
    def list_jobs(
        tenant: Tenant,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[
            str | None, Query(max_length=100, pattern=r"^[0-9]+(\.[0-9]+)?:[0-9a-f]{1,64}$")
        ] = None,
        order: Annotated[
            Literal["desc", "asc"], Query(description="desc: newest first; asc: oldest first")
        ] = "desc",
    ) -> JobPage:
        """The tenant's jobs, newest first (``order=asc``: oldest first); pass ``next_cursor``
        back, as it is, with the same ``order``, for the next page. Every job is listed once,
        jobs submitted together included."""
        records, last = client.list(limit, cursor, tenant=tenant, order=order)
        unfinished = any(not r.status.is_terminal() for r in records)
        fleet = read_fleet(client.store.client, client.keys) if unfinished else None  # once for the page
        return JobPage(jobs=[job_out(r, fleet) for r in records], next_cursor=last)

    @app.post(
        "/v1/uploads",
        status_code=201,
        response_model=Upload,
        responses=_responses(401, 413, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload(request: Request, tenant: Tenant) -> Upload:
        """Store input media (the raw file as the body); use the returned key in a request's
        ``image``, ``images``, video or ``audio`` fields as ``{"key": ...}``. Only the tenant's
        own requests can use it."""
        # The body goes to a temporary file as it arrives (BodyLimits cuts it off at
        # FLEET_MAX_INPUT_BYTES), and from there to the store: it is never whole in memory.
        with uploading.holding(tenant), tempfile.TemporaryFile() as file:
            async for chunk in request.stream():
                file.write(chunk)
            if not file.tell():
                raise InvalidRequest([FieldError("file", "empty body; send the file as the request body")])
            # Decoding the media takes as long as the file makes it: off the event loop, so every
            # other request (health checks included) is still answered meanwhile.
            return Upload(**await run_in_threadpool(lambda: client.upload(file, tenant=tenant)))

    @app.post("/v1/keys", status_code=201, response_model=CreatedKey, responses=_responses(401, 409, 422))
    def create_key(tenant: Tenant, body: NewKey) -> CreatedKey:
        """A new API key of the tenant, working at once; the answer is the only place it is
        shown. At most FLEET_MAX_KEYS_PER_TENANT made keys (409 past them), beside the tenant's
        FLEET_TENANTS keys. Rotate a key by making the next, moving to it, and revoking the old."""
        try:
            made, key = client.create_key(body.label, tenant=tenant)
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        return CreatedKey(**made.to_json(), key=key)

    @app.get("/v1/keys", response_model=KeyList, responses=_responses(401))
    def list_keys(tenant: Tenant) -> KeyList:
        """The keys the tenant made, oldest first (never the keys themselves; FLEET_TENANTS keys
        are not listed)."""
        return KeyList(keys=[KeyOut(**k.to_json()) for k in client.list_keys(tenant=tenant)])

    @app.delete("/v1/keys/{key_id}", status_code=204, responses=_responses(401, 404))
    def revoke_key(tenant: Tenant, key_id: str) -> Response:
        """Revoke one of the tenant's keys (any of them, the one calling included): refused from
        the next request on. Another tenant's key is a 404, as one that does not exist."""
        try:
            client.revoke_key(key_id, tenant=tenant)
        except NotFound:
            raise HTTPException(404, f"no key {key_id}") from None
        return Response(status_code=204)

    @app.get("/v1/usage", response_model=UsageOut, responses=_responses(401, 422))
    def usage(
        tenant: Tenant,
        start: Annotated[
            str | None,
            Query(pattern=_DATE, description="first UTC day, YYYY-MM-DD; default: end's month's first"),
        ] = None,
        end: Annotated[
            str | None, Query(pattern=_DATE, description="last UTC day, YYYY-MM-DD; default: today")
        ] = None,
    ) -> dict[str, Any]:
        """What the tenant used, by UTC day, model, class and end, ``start`` to ``end`` (both
        included, at most FLEET_USAGE_MAX_DAYS days, kept FLEET_USAGE_RETENTION_DAYS): the jobs
        that ended, their GPU-seconds and their outputs. A job counts on the day it ended."""
        return client.usage(_day("start", start), _day("end", end), tenant=tenant).to_json()

    # OpenAI's ``created`` of a model: when this API process began serving it (the fleet keeps
    # no release dates), as other OpenAI-compatible servers answer it.
    serving_since = int(time.time())

    def openai_model(spec: ModelSpec) -> dict[str, Any]:
        return {
            "id": spec.key,
            "object": "model",
            "created": serving_since,
            "owned_by": spec.hub_id.partition("/")[0],
        }

    @app.get("/v1/models", responses=_responses(401))
    def models(_tenant: Tenant) -> dict[str, Any]:
        """The catalog (``models``: each model's kinds, class, sizes, steps, step caches, LoRAs and
        variants) and the classes; and, for the OpenAI SDKs' ``models.list()``, OpenAI's list of
        the models the fleet serves (``object``, ``data``: ``id``, ``created``, ``owned_by``)."""
        return {
            "object": "list",
            "data": [openai_model(spec) for spec in CATALOG.values() if spec.served and spec.released],
            "models": [
                {
                    "key": spec.key,
                    "kinds": [k.value for k in spec.task_kinds],
                    "class": spec.vram_class.value,
                    "served": spec.served,
                    "cache_methods": list(spec.cache_methods),
                    "pipeline": spec.pipeline,
                    "hub_id": spec.hub_id,
                    "size": vars(spec.size),
                    "default_steps": spec.default_steps,
                    "max_steps": spec.max_steps,
                    "video": vars(spec.video) if spec.video else None,
                    "max_input_images": spec.max_input_images,
                    "takes_loras": spec.lora_modules is not None,
                    "variants": [_variant_info(variant) for variant in spec.variants.values()],
                }
                for spec in CATALOG.values()
            ],
            "classes": [
                {
                    "class": c.value,
                    "vram_gb": c.vram_gb,
                    "gpu_vram_gb": c.gpu_vram_gb,
                    "consumes": consumed_queues(c),
                }
                for c in VramClass
            ],
        }

    @app.get(
        "/v1/models/{model_id}",
        responses={
            **_responses(401),
            404: {"model": OpenAIError, "description": "no such model, or one not served"},
        },
        tags=["OpenAI-compatible"],
    )
    def retrieve_model(_tenant: Tenant, model_id: str) -> Any:
        """OpenAI's ``models.retrieve``: a model the fleet serves, in OpenAI's shape."""
        spec = CATALOG.get(model_id)
        if spec is None or not (spec.served and spec.released):
            message = f"no model {model_id!r}: GET /v1/models lists the ones served"
            return Refused(404, message, "invalid_request_error", "model", "model_not_found").answer()
        return openai_model(spec)

    registry.register(
        FleetCollector(
            client.store.client,
            client.keys,
            settings.redis_min_replicas,
            per_tenant=settings.metrics_per_tenant,
            budgets={
                name: tenant.gpu_s_per_month
                for name, tenant in settings.tenants.items()
                if tenant.gpu_s_per_month is not None
            },
        )
    )
    requests_total = Counter(
        "fleet_api_requests",
        "API requests by route and status",
        ["method", "route", "status"],
        registry=registry,
    )

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        requests_total.labels(request.method, path, str(response.status_code)).inc()
        return response

    @app.get("/healthz", responses={503: {"model": ErrorDetail, "description": "Redis unreachable"}})
    async def healthz() -> JSONResponse:
        # On threads of its own: the liveness probe never waits behind request work.
        try:
            await anyio.to_thread.run_sync(client.store.client.ping, limiter=health_threads)
        except Exception as exc:  # any failure to reach Redis means not healthy
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, 503)
        return JSONResponse({"status": "ok"})

    return app


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document ``/openapi.json`` serves (the settings do not change it): what
    ``clients/typescript/openapi.json`` saves for building the client offline (``make openapi``)."""
    return create_app(Settings()).openapi()


def __getattr__(name: str) -> Any:
    # ``uvicorn producer.api:app`` builds the app on first access, from the environment.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)


def _variant_info(variant: Variant) -> dict[str, Any]:
    """A variant as ``GET /v1/models`` lists it: what a request naming it runs by default."""
    return {
        "name": variant.key,
        "steps": variant.steps,
        "guidance_scale": variant.guidance,
        # A DMD checkpoint runs exactly its steps; a LoRA variant's are a default.
        "fixed_steps": bool(variant.dmd_timesteps),
        "weights": "checkpoint" if variant.checkpoint else "lora",
        "hub_id": variant.repo,
    }

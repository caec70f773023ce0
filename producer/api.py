"""The HTTP API backends in any language use: ``uvicorn producer.api:app``.

Every route but ``/healthz`` takes ``Authorization: Bearer <api key>``; the key names the tenant
(``FLEET_TENANTS``), and a tenant sees only its own jobs (anything else is a 404, the same as a job
that does not exist). Errors are JSON: ``{"errors": [{"field", "message"}]}`` for a refused
request (422), ``{"detail": "..."}`` otherwise. The OpenAPI document is at ``/openapi.json``.
"""

import hmac
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.client import Client
from producer.metrics import FleetCollector
from routing.catalog import CATALOG
from routing.classes import Priority, VramClass, consumed_queues
from routing.errors import Conflict, FieldError, InvalidRequest, NotFound, TooManyJobs, Unavailable
from routing.jobs import webhook_log as webhooks
from routing.jobs.eta import estimate
from routing.jobs.store import WEBHOOK_EVENTS, JobRecord, Webhook
from routing.schemas import REQUEST_TYPES
from routing.settings import Settings, get_settings

WebhookEvent = Literal["started", "progress", "succeeded", "failed", "canceled"]
assert set(WebhookEvent.__args__) == set(WEBHOOK_EVENTS)


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=4096)
    events: list[WebhookEvent] = Field(default_factory=lambda: list(WEBHOOK_EVENTS), min_length=1)


class _SubmitOptions(BaseModel):
    priority: Priority = Priority.NORMAL
    webhook: WebhookIn | None = None


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


class ErrorField(BaseModel):
    field: str
    message: str


class ErrorList(BaseModel):
    """A refused request: every offending field, named."""

    errors: list[ErrorField]


class ErrorDetail(BaseModel):
    detail: str


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {
        401: "no API key, or an unknown one",
        404: "no such job, or not the tenant's",
        409: "the Idempotency-Key was used with another body",
        422: "the request was refused; nothing was queued",
        429: "the tenant has as many unfinished jobs as it may; retry after Retry-After seconds",
        503: "the job store is unreachable; nothing was queued",
    }
    return {
        code: {"model": ErrorList if code == 422 else ErrorDetail, "description": what[code]}
        for code in codes
    }


class Progress(BaseModel):
    step: int
    total: int


class OutputOut(BaseModel):
    key: str
    url: str
    content_type: str
    size_bytes: int
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: int | None = None
    seed: int | None = None
    cache: str | None = Field(
        default=None, description="step-caching method it was made with; null: uncached"
    )


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
    outputs: list[OutputOut]
    error: dict[str, str] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: dict[str, float]
    webhook: WebhookIn | None
    request: dict[str, Any]


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


class Upload(BaseModel):
    key: str


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    client = Client(settings)
    keys_to_tenant = [
        (key.get_secret_value().encode(), name)
        for name, tenant in settings.tenants.items()
        for key in tenant.api_keys
    ]
    app = FastAPI(title="GPU fleet", version="1", description=__doc__)
    app.state.client = client

    bearer = HTTPBearer(auto_error=False, description="an API key of your tenant")

    def tenant_of(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> str:
        key = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
        if not key:
            raise HTTPException(401, "send Authorization: Bearer <api key>", {"WWW-Authenticate": "Bearer"})
        found = None
        for known, name in keys_to_tenant:  # compare every key, in constant time each
            if hmac.compare_digest(known, key.encode()):
                found = name
        if found is None:
            raise HTTPException(401, "unknown API key", {"WWW-Authenticate": "Bearer"})
        return found

    Tenant = Annotated[str, Depends(tenant_of)]

    def own_job(job_id: str, tenant: str) -> JobRecord:
        try:
            record = client.status(job_id)
        except NotFound:
            record = None
        if record is None or record.tenant != tenant:
            raise HTTPException(404, f"no job {job_id}")
        return record

    def job_out(record: JobRecord) -> JobOut:
        expiry = settings.presign_expiry_s
        guess = estimate(client.store.client, client.keys, record)
        return JobOut(
            id=record.id,
            model=record.model,
            kind=record.kind,
            status=record.status.value,
            priority=record.priority,
            attempt=record.attempt,
            progress=Progress(step=record.step, total=record.total_steps),
            queue=record.queue,
            queue_position=guess.position,
            eta_s=guess.eta_s,
            outputs=[OutputOut(url=client.storage.url(o.key, expiry), **vars(o)) for o in record.outputs],
            error=record.error,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            timings=record.timings,
            webhook=WebhookIn(url=record.webhook.url, events=list(record.webhook.events))
            if record.webhook
            else None,
            request=record.request,
        )

    @app.exception_handler(InvalidRequest)
    def invalid(_request: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse({"errors": [{"field": e.field, "message": e.message} for e in exc.errors]}, 422)

    @app.exception_handler(RequestValidationError)
    def malformed(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(_request, InvalidRequest([_field_error(e) for e in exc.errors()]))

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

    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=JobOut,
        responses={
            200: {"model": JobOut, "description": "the earlier job of this Idempotency-Key and body"},
            **_responses(401, 409, 422, 429, 503),
        },
    )
    def submit(
        body: Submission,
        tenant: Tenant,
        response: Response,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ) -> JobOut:
        """Queue a job. The same ``Idempotency-Key`` and body return the same job (200); the
        same key with another body is a 409."""
        request = body.model_dump(mode="json", exclude={"priority", "webhook"}, exclude_none=True)
        webhook = Webhook(body.webhook.url, tuple(body.webhook.events)) if body.webhook else None
        limits = settings.tenants[tenant]
        try:
            job = client.submit(
                request,
                idempotency_key=f"{tenant}:{idempotency_key}" if idempotency_key else None,
                priority=body.priority,
                webhook=webhook,
                tenant=tenant,
                max_in_flight=limits.max_in_flight,
            )
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        except TooManyJobs as exc:
            raise HTTPException(429, str(exc), {"Retry-After": "10"}) from None
        if not job.created:
            response.status_code = 200  # the earlier job, not a new one
        return job_out(client.status(job.id))

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=_responses(401, 404, 422))
    def status(job_id: str, tenant: Tenant) -> JobOut:
        return job_out(own_job(job_id, tenant))

    @app.delete("/v1/jobs/{job_id}", response_model=JobOut, responses=_responses(401, 404, 422))
    def cancel(job_id: str, tenant: Tenant) -> JobOut:
        """Cancel: a queued job never runs; a running one stops at its next step. A finished job
        is returned as it is."""
        own_job(job_id, tenant)
        return job_out(client.cancel(job_id))

    @app.get("/v1/jobs/{job_id}/webhooks", responses=_responses(401, 404, 422))
    def webhook_deliveries(job_id: str, tenant: Tenant) -> dict[str, Any]:
        """Every delivery attempt of the job's webhook events, oldest first: status codes,
        errors, times, and what became of each (delivered, retrying, failed, disabled, refused)."""
        own_job(job_id, tenant)
        return {"deliveries": webhooks.delivery_log(client.store.client, client.keys, job_id)}

    @app.post(
        "/v1/jobs/{job_id}/webhooks/{event_id}/replay", status_code=202, responses=_responses(401, 404, 422)
    )
    def replay_webhook(job_id: str, event_id: str, tenant: Tenant) -> dict[str, str]:
        """Deliver an event again, with its original webhook-id. An endpoint that a 410 disabled
        is enabled again: replaying is how a tenant says it is back."""
        record = own_job(job_id, tenant)
        entries = [
            e
            for e in webhooks.delivery_log(client.store.client, client.keys, job_id)
            if e["event_id"] == event_id
        ]
        if not entries:
            raise HTTPException(404, f"no delivery of event {event_id} for job {job_id}")
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
        cursor: Annotated[str | None, Query(max_length=40, pattern=r"^[0-9]+(\.[0-9]+)?$")] = None,
    ) -> JobPage:
        """The tenant's jobs, newest first; pass ``next_cursor`` back for the next page."""
        records, last = client.list_page(tenant, limit, float(cursor) if cursor else None)
        return JobPage(
            jobs=[job_out(r) for r in records], next_cursor=repr(last) if last is not None else None
        )

    @app.post(
        "/v1/uploads",
        status_code=201,
        response_model=Upload,
        responses=_responses(401, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload(request: Request, _tenant: Tenant) -> Upload:
        """Store input media (the raw file as the body); use the returned key in a request's
        ``image``, ``images``, video or ``audio`` fields as ``{"key": ...}``."""
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > settings.max_input_bytes:
                raise InvalidRequest([FieldError("file", f"larger than {settings.max_input_bytes} bytes")])
        if not data:
            raise InvalidRequest([FieldError("file", "empty body; send the file as the request body")])
        return Upload(**client.upload(bytes(data)))

    @app.get("/v1/models", responses=_responses(401))
    def models(_tenant: Tenant) -> dict[str, Any]:
        return {
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

    registry = CollectorRegistry()
    registry.register(FleetCollector(client.store.client, client.keys))
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

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus metrics of the whole fleet (producer/metrics.py) and of this API process.
        Unauthenticated like /healthz: serve it on the internal network only."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", responses={503: {"model": ErrorDetail, "description": "Redis unreachable"}})
    def healthz() -> JSONResponse:
        try:
            client.store.client.ping()
        except Exception as exc:  # any failure to reach Redis means not healthy
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, 503)
        return JSONResponse({"status": "ok"})

    return app


def _field_error(error: dict[str, Any]) -> FieldError:
    # FastAPI's location starts with "body" and, for a union, the tag of the schema tried.
    loc = [str(part) for part in error["loc"]]
    if loc and loc[0] in ("body", "header", "query", "path"):
        loc = loc[1:]
    kinds = {k.value for k in REQUEST_TYPES}
    if loc and loc[0] in kinds:
        loc = loc[1:]
    field = ".".join(loc) or "request"
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        return FieldError("kind", f"required, one of: {', '.join(sorted(kinds))}")
    if error["type"] == "extra_forbidden":
        return FieldError(field, "unknown field")
    return FieldError(field, error["msg"].removeprefix("Value error, "))


def __getattr__(name: str) -> Any:
    # ``uvicorn producer.api:app`` builds the app on first access, from the environment.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)

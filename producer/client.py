"""The Python SDK backends use to submit jobs and learn their outcome.

    client = Client()                                   # settings from FLEET_* variables
    job = client.submit({"model": "z-image-turbo", "prompt": "a red fox", "width": 512, "height": 512})
    record = job.wait(timeout_s=120)                    # JobRecord, terminal
    for out in job.result():                            # presigned URLs of the outputs
        print(out.url)

Errors are those of ``routing.errors`` (``InvalidRequest``, ``NotFound``, ``Conflict``,
``Unavailable``, ``JobNotSucceeded``, ``WaitTimeout``), all ``FleetError``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import redis
from celery import Celery

from producer.api_keys import ApiKey, ApiKeys
from producer.inputs import (
    InputLimits,
    delete_inputs,
    fetch_deadline,
    resolve_inputs,
    resolve_loras,
    upload,
)
from producer.tenant_keys import KeyScope, check_tenant, folder, input_prefix
from routing import tracing
from routing.celery_config import make_celery
from routing.classes import Priority, queue_name
from routing.decision import route
from routing.errors import (
    Conflict,
    FieldError,
    InvalidRequest,
    JobNotSucceeded,
    NotFound,
    NotReplicated,
    OverBudget,
    TooManyJobs,
    Unavailable,
    WaitTimeout,
)
from routing.io.connection import Replication, connect
from routing.io.net import UrlPolicy
from routing.io.storage import Storage, job_folder, make_storage
from routing.jobs.events import Webhook, check_webhook
from routing.jobs.keys import Keys, is_job_id
from routing.jobs.messages import TaskMessages
from routing.jobs.record import JobRecord, JobStatus, Output
from routing.jobs.store import ORDERS, Created, Cursor, Deleted, JobStore, NewJob
from routing.jobs.usage import Usage, month_gpu_s, next_month_at, query_range, read_usage
from routing.limits import RequestLimits
from routing.schemas import RequestBase, parse_request
from routing.settings import Settings, get_settings

ProgressCallback = Callable[[JobRecord], None]


class Client:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis_client: redis.Redis | None = None,
        celery_app: Celery | None = None,
        storage: Storage | None = None,
        url_policy: UrlPolicy | None = None,
    ):
        self.settings = settings or get_settings()
        self._redis = redis_client or connect(self.settings)
        self._messages = TaskMessages(celery_app or make_celery(self.settings))
        self._storage = storage
        self.keys = Keys(self.settings.key_prefix)
        self.store = JobStore(
            self._redis,
            self.keys,
            ttl_s=self.settings.job_ttl_s,
            messages=self._messages,
            progress_webhook_interval_s=self.settings.progress_webhook_interval_s,
            canceled_ttl_s=self.settings.canceled_job_ttl_s,
            deleted_ttl_s=self.settings.deleted_job_ttl_s,
            usage_retention_days=self.settings.usage_retention_days,
            replication=Replication.of(self.settings),
        )
        self.api_keys = ApiKeys(
            self._redis, self.keys, self.settings.max_keys_per_tenant, Replication.of(self.settings)
        )
        # Where input media and webhooks may point (a resolver of its own for tests).
        self.url_policy = url_policy or UrlPolicy.of(self.settings)
        self._input_limits = InputLimits(
            max_bytes=self.settings.max_input_bytes,
            fetch_timeout_s=self.settings.fetch_timeout_s,
            video_max_pixels=self.settings.max_input_video_pixels,
            video_max_decode_pixels=self.settings.max_input_video_decode_pixels,
            lora_max_bytes=self.settings.max_lora_bytes,
            lora_max_rank=self.settings.lora_max_rank,
            lora_max_header_bytes=self.settings.lora_max_header_bytes,
            lora_max_tensors=self.settings.lora_max_tensors,
            lora_hub=self.settings.lora_hub,
        )
        # What requests are accepted under; each job keeps them, and its worker checks it under them.
        self.limits = RequestLimits.from_settings(self.settings)

    @property
    def storage(self) -> Storage:
        # Built on first use: a backend that only submits never needs storage credentials.
        if self._storage is None:
            self._storage = make_storage(self.settings)
        return self._storage

    def submit(
        self,
        request: Mapping[str, Any] | RequestBase,
        idempotency_key: str | None = None,
        *,
        priority: Priority | str = Priority.NORMAL,
        webhook: Webhook | None = None,
        tenant: str = "",
        max_in_flight: int = 0,
        gpu_s_per_month: float | None = None,
    ) -> Job:
        """Validate, route and queue ``request``. Nothing is queued, and nothing stays stored,
        when it raises or returns an earlier job.

        With ``idempotency_key``, a second submit of the same request (and options) returns the
        first job; the same key with anything else raises ``Conflict``. ``webhook`` gets the
        job's events signed with the tenant's secret. ``max_in_flight`` and ``gpu_s_per_month``
        are the tenant's limits (``FLEET_TENANTS``; the API passes them): past them it raises
        ``TooManyJobs`` and ``OverBudget``.
        """
        jobs = self.submit_many(
            [request],
            [idempotency_key],
            priority=priority,
            webhook=webhook,
            tenant=tenant,
            max_in_flight=max_in_flight,
            gpu_s_per_month=gpu_s_per_month,
        )
        return jobs[0]

    def submit_many(
        self,
        requests: Sequence[Mapping[str, Any] | RequestBase],
        idempotency_keys: Sequence[str | None] | None = None,
        *,
        priority: Priority | str = Priority.NORMAL,
        webhook: Webhook | None = None,
        tenant: str = "",
        max_in_flight: int = 0,
        gpu_s_per_month: float | None = None,
    ) -> list[Job]:
        """Submit several requests in one round trip to Redis.

        Every request is validated first: if any is invalid, ``InvalidRequest`` names it by index
        (``"3.width"``) and none is queued. Each accepted job is written atomically on its own.
        A tenant whose jobs this UTC month used ``gpu_s_per_month`` is refused the whole batch
        (``OverBudget``) unless every request repeats an idempotency key, which answers its job.
        """
        try:
            priority = Priority(priority)
        except ValueError:
            raise InvalidRequest([FieldError("priority", "must be high, normal or low")]) from None
        check_tenant(tenant)
        if webhook is not None:
            check_webhook(webhook, self.url_policy)
        keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(requests)
        if len(keys) != len(requests):
            raise ValueError("one idempotency key (or None) per request")
        parsed = []
        routes = []  # decided before any input is fetched: a request no class holds is refused here
        for index, request in enumerate(requests):
            with _numbered(index, len(requests)):
                parsed.append(parse_request(request, limits=self.limits))
                routes.append(route(parsed[-1], self.settings.vram_margin_gib))
        # The hash is of the request as given: inputs stored for it get keys of their own job.
        options = (
            f"{priority.value}|{webhook.url if webhook else ''}|{','.join(webhook.events) if webhook else ''}"
        )
        hashes = [
            hashlib.sha256(f"{tenant}|{options}|{p.model_dump_json()}".encode()).hexdigest() for p in parsed
        ]
        # What the store would refuse is refused before any input is fetched or stored: a repeated
        # idempotency key, and a tenant at its limit. The store's create checks both again.
        with _redis_errors():
            earlier = self._earlier_jobs(keys)
            if gpu_s_per_month is not None and any(found is None for found in earlier):
                self._check_budget(tenant, gpu_s_per_month)
            room = len(requests)
            if max_in_flight:
                room = max_in_flight - self._redis.scard(self.keys.tenant_in_flight(tenant))
        scope = KeyScope(tenant, self._job_tenant)
        traceparent = tracing.traceparent()  # the caller's span: every job's runs go under it
        outcomes: dict[int, tuple[Created, str]] = {}
        started: dict[int, tuple[str, RequestBase]] = {}  # requests whose inputs may be stored
        new: dict[int, NewJob] = {}
        try:
            for index, (request, idempotency_key) in enumerate(zip(parsed, keys, strict=True)):
                if earlier[index] is not None:
                    outcomes[index] = (Created.EXISTS, earlier[index])
                    continue
                if room <= 0:
                    outcomes[index] = (Created.LIMITED, "")
                    continue
                room -= 1
                job_id = uuid.uuid4().hex
                started[index] = (job_id, request)
                with _numbered(index, len(requests)):
                    resolved = self._resolve(request, job_id, scope)
                queue = queue_name(routes[index].vram_class, priority)
                new[index] = NewJob(
                    id=job_id,
                    model=resolved.model,
                    kind=resolved.kind.value,
                    request_json=resolved.model_dump_json(),
                    queue=queue,
                    message=self._messages.run_job(job_id, queue),
                    idempotency_key=idempotency_key,
                    request_hash=hashes[index],
                    tenant=tenant,
                    priority=priority.value,
                    webhook=webhook,
                    max_in_flight=max_in_flight,
                    limits=self.limits,
                    traceparent=traceparent,
                )
            found = [outcome for outcome in outcomes.values() if outcome[0] is Created.EXISTS]
            with _redis_errors():
                if new:
                    try:
                        created = self.store.create(list(new.values()))
                    except NotReplicated as exc:
                        # On the master, and may run: its inputs stay.
                        outcomes |= dict(zip(new, exc.outcomes, strict=True))
                        raise
                    outcomes |= dict(zip(new, created, strict=True))
                for index, (outcome, found_id) in sorted(outcomes.items()):
                    if outcome is Created.EXISTS and self.store.request_hash(found_id) != hashes[index]:
                        raise Conflict(f"idempotency key {keys[index]!r} was used for another request")
                if found:  # earlier jobs are answered once the replicas hold them, as new ones are
                    self.store.confirm(found)
        finally:
            # Nothing stays stored for a request that was not queued.
            for index, (job_id, request) in started.items():
                if outcomes.get(index, (None, ""))[0] is not Created.CREATED:
                    delete_inputs(request, job_id, self.storage, tenant)
        results = [outcomes[index] for index in range(len(requests))]
        limited = sum(outcome is Created.LIMITED for outcome, _ in results)
        if limited:
            raise TooManyJobs(
                f"tenant {tenant!r} has {max_in_flight} unfinished jobs; {limited} of {len(requests)} not queued",
                accepted=[
                    Job(self, found_id) for outcome, found_id in results if outcome is not Created.LIMITED
                ],
            )
        return [Job(self, found_id, created=outcome is Created.CREATED) for outcome, found_id in results]

    def _check_budget(self, tenant: str, gpu_s_per_month: float) -> None:
        """Raise ``OverBudget`` when the tenant's jobs that ended this UTC month used
        ``gpu_s_per_month`` GPU-seconds, as its usage counts them. Jobs still queued or running
        count once they end: a tenant just under its budget may pass it by those."""
        used = month_gpu_s(self._redis, self.keys, folder(tenant))
        if used >= gpu_s_per_month:
            raise OverBudget(
                f"tenant {tenant!r} has used {used:g} of its {gpu_s_per_month:g} GPU-seconds this month "
                f"(gpu_s_per_month); no job was queued",
                retry_at=next_month_at(dt.datetime.now(dt.UTC).date()),
            )

    def _resolve(self, request: RequestBase, job_id: str, scope: KeyScope) -> RequestBase:
        """``request`` with its media and LoRAs checked and named by store key; its downloads,
        media and LoRAs together, end within ``fetch_timeout_s``."""
        deadline = fetch_deadline(self._input_limits)
        if request.media_fields():
            request = resolve_inputs(
                request, job_id, self.storage, self.url_policy, self._input_limits, scope, deadline
            )
        if request.loras:
            request = resolve_loras(
                request, self.storage, self.url_policy, self._input_limits, scope, deadline
            )
        return request

    def job_of_idempotency_key(self, idempotency_key: str) -> str | None:
        """The job ``idempotency_key`` was used for, or None."""
        with _redis_errors():
            return self._earlier_jobs([idempotency_key])[0]

    def confirm_replicated(self, job_id: str) -> None:
        """Return once ``FLEET_REDIS_MIN_REPLICAS`` replicas hold the job (an earlier job about to
        be answered again), else raise ``NotReplicated``; at once without replicas asked for."""
        with _redis_errors():
            self.store.confirm([(Created.EXISTS, job_id)])

    def _earlier_jobs(self, idempotency_keys: list[str | None]) -> list[str | None]:
        """The job each idempotency key was used for already; None for a new or absent key."""
        named = [self.keys.idempotency(key) for key in idempotency_keys if key]
        found = iter(self._redis.mget(named) if named else [])
        return [_decoded(next(found)) if key else None for key in idempotency_keys]

    def _job_tenant(self, job_id: str) -> str | None:
        with _redis_errors():
            return _decoded(self._redis.hget(self.keys.job(job_id), "tenant"))

    def upload(self, data: bytes | str | Path | BinaryIO, *, tenant: str = "") -> dict[str, str]:
        """Check and store an image, video, audio or LoRA file (bytes, a path, or a seekable
        binary file, read from its start) under ``uploads/<tenant>/``; returns ``{"key": ...}`` to
        put in a request of the same tenant (e.g. ``{"images": [client.upload("cat.png")]}``)."""
        check_tenant(tenant)
        if isinstance(data, str | Path):
            with Path(data).open("rb") as file:
                return upload(self.storage, file, self._input_limits, tenant)
        return upload(self.storage, data, self._input_limits, tenant)

    def get(self, job_id: str) -> JobRecord:
        with _redis_errors():
            return self.store.get(job_id)

    def list(
        self, limit: int = 20, cursor: str | None = None, *, tenant: str = "", order: str = "desc"
    ) -> tuple[list[JobRecord], str | None]:
        """A tenant's jobs, newest first (``order="asc"``: oldest first), and the cursor of the
        next page (None when this page is the last): the verb and answer of the HTTP SDK's
        ``list``.

        Jobs are ordered by (``created_at``, id), and the cursor names the last one listed
        (``<created_at>:<id>``, to be passed back as it is, with the same ``order``): the jobs of
        one ``submit_many`` share a ``created_at``, and each is listed once. Two round trips
        whatever ``limit`` is."""
        if order not in ORDERS:
            raise InvalidRequest([FieldError("order", "must be desc (newest first) or asc (oldest first)")])
        after = Cursor.parse(cursor) if cursor else None
        with _redis_errors():
            entries = self.store.page(tenant, limit, after, order)
            ids = [job_id for job_id, _created_at in entries]
            records = self.store.get_many(ids)
            expired = [job_id for job_id, record in zip(ids, records, strict=True) if record is None]
            if expired:  # records gone with their TTL: drop them from the index
                self._redis.zrem(self.keys.tenant_jobs(tenant), *expired)
        last = str(Cursor(entries[-1][1], entries[-1][0])) if len(entries) == limit else None
        return [r for r in records if r is not None], last

    def usage(self, start: dt.date | None = None, end: dt.date | None = None, *, tenant: str = "") -> Usage:
        """What ``tenant`` used from ``start`` to ``end`` (UTC days, both included; by default its
        month to date): a row per day, model, class and end, and their totals
        (``routing.jobs.usage``), with its GPU budget for a month where ``FLEET_TENANTS`` gives
        it one. The verb and answer of the HTTP SDK's ``usage``."""
        start, end = query_range(start, end, self.settings.usage_max_days)
        with _redis_errors():
            usage = read_usage(self._redis, self.keys, folder(check_tenant(tenant)), start, end)
        configured = self.settings.tenants.get(tenant)
        return dataclasses.replace(usage, gpu_s_per_month=configured.gpu_s_per_month if configured else None)

    def create_key(self, label: str = "", *, tenant: str) -> tuple[ApiKey, str]:
        """A new API key of ``tenant`` (one of ``FLEET_TENANTS``): its listing, and the key,
        which nothing keeps (``producer.api_keys``). The verb and answer of the HTTP SDK's."""
        with _redis_errors():
            return self.api_keys.create(self._configured(tenant), label)

    def list_keys(self, *, tenant: str) -> list[ApiKey]:
        """``tenant``'s managed API keys, oldest first (never the keys themselves)."""
        with _redis_errors():
            return self.api_keys.list(self._configured(tenant))

    def revoke_key(self, key_id: str, *, tenant: str) -> None:
        """Revoke one of ``tenant``'s managed keys: refused from the next request on."""
        with _redis_errors():
            self.api_keys.revoke(self._configured(tenant), key_id)

    def tenant_of_key(self, key: str) -> str | None:
        """The tenant a managed key belongs to while it is one of ``FLEET_TENANTS``, else None."""
        with _redis_errors():
            found = self.api_keys.tenant_of(key)
        return found if found in self.settings.tenants else None

    def _configured(self, tenant: str) -> str:
        if tenant not in self.settings.tenants:
            raise InvalidRequest([FieldError("tenant", f"{tenant!r} is not one of FLEET_TENANTS")])
        return tenant

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel: a queued job never runs, a running one stops at its next step. A finished job
        is returned unchanged."""
        with _redis_errors():
            self.store.cancel(job_id)
            return self.store.get(job_id)

    def delete(self, job_id: str) -> None:
        """Delete an ended job now, rather than at its TTL: its files from the store (its whole
        ``jobs/<id>/`` folder: its outputs, what a killed attempt left, previews made of a video;
        and the copies of the media it was given by URL, ``inputs/<tenant>/<id>/``), then its
        record. The tenant's uploads stay: other requests may name them. A job deleted within
        ``FLEET_DELETED_JOB_TTL_S`` is deleted already: a repeat returns as the first did. Raises
        ``Conflict`` for a job not ended (cancel it first) and ``NotFound``."""
        try:
            record = self.get(job_id)
        except NotFound:
            if self.deleted(job_id) is None:
                raise
            return
        if not record.status.is_terminal():
            raise Conflict(f"job {job_id} is {record.status.value}: only an ended job can be deleted")
        # First: a failure here leaves the record, to delete again. Every output is in the folder.
        for prefix in (job_folder(job_id), input_prefix(record.tenant, job_id)):
            for key in self.storage.list(prefix):
                self.storage.delete(key)
        with _redis_errors():
            self.store.forget(job_id)

    def deleted(self, job_id: str) -> Deleted | None:
        """Whose ``job_id`` was, and its kind, if it was deleted within
        ``FLEET_DELETED_JOB_TTL_S``, else None (its record is gone: nothing else of it is kept)."""
        if not is_job_id(job_id):  # never cut into a key name: no job has it
            return None
        with _redis_errors():
            return self.store.deleted(job_id)

    def wait(
        self, job_id: str, timeout_s: float | None = None, on_progress: ProgressCallback | None = None
    ) -> JobRecord:
        """Block until the job is terminal and return its record; ``on_progress`` is called with
        the record each time the job changes. Raises ``WaitTimeout`` after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with _redis_errors():
            # Take the stream position before reading the record, so no event between the two
            # is missed.
            last_id = self._last_event_id()
            record = self.store.get(job_id)
            while not record.status.is_terminal():
                if on_progress is not None:
                    on_progress(record)
                block_ms = 1000
                if deadline is not None:
                    left_s = deadline - time.monotonic()
                    if left_s <= 0:
                        raise WaitTimeout(f"job {job_id} is still {record.status.value} after {timeout_s} s")
                    block_ms = max(1, min(block_ms, int(left_s * 1000)))
                last_id = self._wait_for_event(job_id, last_id, block_ms)
                record = self.store.get(job_id)
        return record

    def result(self, job_id: str) -> list[Output]:
        """The outputs of a succeeded job, with presigned URLs. Raises ``JobNotSucceeded`` for a
        failed or canceled job and ``Conflict`` for one not finished yet."""
        record = self.get(job_id)
        if record.status in (JobStatus.FAILED, JobStatus.CANCELED):
            reason = record.error.message if record.error else ""
            raise JobNotSucceeded(record, f"job {job_id} {record.status.value}: {reason}".rstrip(": "))
        if record.status is not JobStatus.SUCCEEDED:
            raise Conflict(f"job {job_id} is {record.status.value}; it has no result yet")
        expires_s = self.settings.presign_expiry_s
        return [o.with_url(self.storage.url(o.key, expires_s)) for o in record.outputs]

    def download(self, job_id: str, directory: str | Path) -> list[Path]:
        """Save a succeeded job's outputs into ``directory``, read from the store; returns their
        paths. Raises as ``result`` does."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for output in self.result(job_id):
            path = directory / f"{job_id}-{Path(output.key).name}"
            path.write_bytes(self.storage.get(output.key))
            paths.append(path)
        return paths

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _last_event_id(self) -> str:
        last = self._redis.xrevrange(self.keys.events, count=1)
        return last[0][0].decode() if last else "0-0"

    def _wait_for_event(self, job_id: str, last_id: str, block_ms: int) -> str:
        """Read the events stream from ``last_id`` until one of ``job_id``'s events arrives or
        ``block_ms`` passes; returns the new stream position."""
        deadline = time.monotonic() + block_ms / 1000
        wanted = job_id.encode()
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return last_id
            reply = self._redis.xread({self.keys.events: last_id}, block=left_ms, count=500)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id.decode()
                    if fields.get(b"job_id") == wanted:
                        return last_id


class Job:
    """A handle on one submitted job. ``created`` is false when an idempotency key returned an
    earlier job."""

    def __init__(self, client: Client, job_id: str, created: bool = True):
        self.client = client
        self.id = job_id
        self.created = created

    def get(self) -> JobRecord:
        return self.client.get(self.id)

    def wait(self, timeout_s: float | None = None, on_progress: ProgressCallback | None = None) -> JobRecord:
        return self.client.wait(self.id, timeout_s=timeout_s, on_progress=on_progress)

    def result(self) -> list[Output]:
        return self.client.result(self.id)

    def cancel(self) -> JobRecord:
        return self.client.cancel(self.id)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"


def _decoded(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


@contextmanager
def _numbered(index: int, count: int) -> Iterator[None]:
    """Errors of the ``index``-th of ``count`` requests name it (``"3.width"``), unless it is alone."""
    try:
        yield
    except InvalidRequest as exc:
        if count == 1:
            raise
        raise InvalidRequest([FieldError(f"{index}.{e.field}", e.message) for e in exc.errors]) from None


@contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Unavailable(f"job store unreachable: {exc}") from exc

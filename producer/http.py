"""The HTTP SDK: the fleet's API from a backend anywhere, with an API key and no Redis access.

    from producer.http import Client

    with Client("https://fleet.example.com", api_key="...") as fleet:
        job = fleet.submit({"model": "z-image-turbo", "prompt": "a red fox", "width": 512, "height": 512})
        record = fleet.wait(job.id, timeout_s=120, on_progress=lambda r: print(r.step, r.total_steps))
        paths = fleet.download(job.id, "out/")

``AsyncClient`` has the same verbs as coroutines. ``wait`` follows the job's live events
(``GET /v1/jobs/{id}/events``) rather than polling, reconnecting with ``Last-Event-ID`` when the
connection drops. A submit carries an idempotency key (a new one per call unless given), so the
retry of a submit whose response was lost returns the job it made instead of a second one.

Errors are ``routing.errors``, drawn from the API's status and error body:

    FleetError
    ├── InvalidRequest     422: the request was refused, nothing queued (``errors`` names fields)
    ├── Unauthorized       401: no API key, or an unknown one
    ├── NotFound           404: no such job, or not the tenant's
    ├── Conflict           409: the idempotency key was used with another request; result() of
    │                      an unfinished job
    ├── TooManyJobs        429 after the retries (each waits out ``Retry-After``)
    ├── Unavailable        503 after the retries, or the API could not be reached
    ├── JobNotSucceeded    result() of a job that failed or was canceled
    └── WaitTimeout        wait() ran out of time (the job goes on)

Only httpx and the contract's plain types are imported here: no Redis, no torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from routing.errors import (
    Conflict,
    FieldError,
    FleetError,
    InvalidRequest,
    JobNotSucceeded,
    NotFound,
    TooManyJobs,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from routing.jobs.events import Webhook
from routing.jobs.record import JobStatus, JobView, Output

__all__ = [
    "AsyncClient",
    "Client",
    "Conflict",
    "FieldError",
    "FleetError",
    "InvalidRequest",
    "JobNotSucceeded",
    "JobStatus",
    "JobView",
    "NotFound",
    "TooManyJobs",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "Webhook",
]

_RETRIED_STATUS = (429, 503)
_TERMINAL_EVENTS = ("succeeded", "failed", "canceled")


ProgressCallback = Callable[[JobView], None]


@dataclass(frozen=True)
class _Event:
    id: str
    name: str
    data: dict[str, Any]


class _SseDecoder:
    """Server-Sent Events, one line at a time (the subset the API sends: id, event, data)."""

    def __init__(self) -> None:
        self._id, self._name, self._data = "", "", []

    def feed(self, line: str) -> _Event | None:
        if not line:
            event = _Event(self._id, self._name, json.loads("\n".join(self._data))) if self._data else None
            self._id, self._name, self._data = "", "", []
            return event
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            self._id = value
        elif name == "event":
            self._name = value
        elif name == "data":
            self._data.append(value)
        return None  # a comment (keepalive) or a field of an event still being read


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float,
        max_retries: int,
        max_retry_wait_s: float,
    ):
        if not api_key:
            raise ValueError("an API key is needed (FLEET_API_KEY)")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self._headers = {"Authorization": f"Bearer {api_key}"}

    def _submit_body(
        self, request: Mapping[str, Any], priority: str, webhook: Webhook | None
    ) -> dict[str, Any]:
        body = dict(request)
        if "kind" not in body:
            body["kind"] = _only_kind(str(body.get("model", "")))
        if priority != "normal":
            body["priority"] = priority
        if webhook is not None:
            body["webhook"] = {"url": webhook.url, "events": list(webhook.events)}
        return body

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        retry_after = response.headers.get("Retry-After", "") if response is not None else ""
        if retry_after.isdigit():
            return min(float(retry_after), self.max_retry_wait_s)
        return random.uniform(0, min(self.max_retry_wait_s, 0.5 * 2**attempt))  # full jitter

    def _stream_timeout(self, deadline: float | None) -> httpx.Timeout:
        # An idle stream gets a keepalive comment every FLEET_EVENTS_KEEPALIVE_S (15 s): a read
        # that waits far longer is a dead connection.
        read_s = 120.0 if deadline is None else max(0.01, deadline - time.monotonic())
        return httpx.Timeout(self.timeout_s, read=read_s)


class Client(_Base):
    """The fleet's HTTP API, synchronously. ``transport`` is httpx's seam (tests plug in one)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        max_retry_wait_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout_s, max_retries, max_retry_wait_s)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=timeout_s, transport=transport
        )
        self._downloads = httpx.Client(timeout=timeout_s, follow_redirects=True)  # no API key

    def submit(
        self,
        request: Mapping[str, Any],
        idempotency_key: str | None = None,
        *,
        priority: str = "normal",
        webhook: Webhook | None = None,
        wait_s: int | None = None,
    ) -> JobView:
        """Queue ``request``; nothing is queued when it raises. ``wait_s`` (``Prefer: wait``)
        holds the call until the job ends, at most that long: check ``status`` of the answer."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        timeout = self.timeout_s
        if wait_s:
            headers["Prefer"] = f"wait={wait_s}"
            timeout += wait_s
        response = self._send(
            "POST",
            "/v1/jobs",
            json=self._submit_body(request, priority, webhook),
            headers=headers,
            timeout=timeout,
        )
        return JobView.from_json(response.json(), created=response.status_code != 200)

    def get(self, job_id: str) -> JobView:
        return JobView.from_json(self._send("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> JobView:
        return JobView.from_json(self._send("DELETE", f"/v1/jobs/{job_id}").json())

    def list(self, limit: int = 20, cursor: str | None = None) -> tuple[list[JobView], str | None]:
        """The tenant's jobs, newest first, and the cursor of the next page (None: the last)."""
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        page = self._send("GET", "/v1/jobs", params=params).json()
        return [JobView.from_json(j) for j in page["jobs"]], page["next_cursor"]

    def upload(self, data: bytes | str | Path) -> dict[str, str]:
        """Store an input file; returns ``{"key": ...}`` to put in a request."""
        content = data if isinstance(data, bytes) else Path(data).read_bytes()
        headers = {"Content-Type": "application/octet-stream"}
        return self._send("POST", "/v1/uploads", content=content, headers=headers).json()

    def wait(
        self, job_id: str, timeout_s: float | None = None, on_progress: ProgressCallback | None = None
    ) -> JobView:
        """Follow the job's events until it ends; returns the whole record. ``on_progress`` gets
        the record at each event. Raises ``WaitTimeout`` after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        record = self.get(job_id)
        last_id = ""
        while not record.status.is_terminal():
            if on_progress is not None:
                on_progress(record)
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=self._stream_timeout(deadline),
                ) as response:
                    if response.status_code != 200:
                        response.read()
                        _raise_for(response)
                    decoder = _SseDecoder()
                    for line in response.iter_lines():
                        event = decoder.feed(line)
                        if event is None:
                            continue
                        last_id = event.id
                        if event.name in _TERMINAL_EVENTS:
                            break
                        record = _apply(record, event) if event.name == "progress" else self.get(job_id)
                        if on_progress is not None:
                            on_progress(record)
            except httpx.TransportError:
                pass  # dropped or idle past the deadline: reconnect below, from last_id
            if deadline is not None and time.monotonic() >= deadline:
                record = self.get(job_id)
                if not record.status.is_terminal():
                    raise WaitTimeout(f"job {job_id} is still {record.status.value} after {timeout_s} s")
            record = self.get(job_id)
        return record

    def result(self, job_id: str) -> list[Output]:
        return self.get(job_id).result()

    def download(self, job_id: str, directory: str | Path) -> list[Path]:
        """Save a succeeded job's outputs into ``directory``; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for output in self.result(job_id):
            path = directory / f"{job_id}-{Path(output.key).name}"
            if output.url.startswith("file://"):  # the local store of a one-host set-up
                shutil.copyfile(unquote(urlparse(output.url).path), path)
            else:
                with self._downloads.stream("GET", output.url) as response:
                    if response.status_code != 200:
                        raise Unavailable(f"output {output.key}: HTTP {response.status_code}")
                    with path.open("wb") as file:
                        for chunk in response.iter_bytes():
                            file.write(chunk)
            paths.append(path)
        return paths

    def close(self) -> None:
        self._http.close()
        self._downloads.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # Every call may be sent again: reads and cancel are idempotent, a submit carries its
        # idempotency key, an upload stores the same bytes twice at worst.
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise Unavailable(f"{method} {path}: {exc!r}") from exc
            else:
                if response.status_code not in _RETRIED_STATUS or attempt == self.max_retries:
                    return _raise_for(response)
            time.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")


class AsyncClient(_Base):
    """``Client`` for asyncio: the same verbs, as coroutines."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        max_retry_wait_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout_s, max_retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout_s, transport=transport
        )
        self._downloads = httpx.AsyncClient(timeout=timeout_s, follow_redirects=True)

    async def submit(
        self,
        request: Mapping[str, Any],
        idempotency_key: str | None = None,
        *,
        priority: str = "normal",
        webhook: Webhook | None = None,
        wait_s: int | None = None,
    ) -> JobView:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        timeout = self.timeout_s
        if wait_s:
            headers["Prefer"] = f"wait={wait_s}"
            timeout += wait_s
        response = await self._send(
            "POST",
            "/v1/jobs",
            json=self._submit_body(request, priority, webhook),
            headers=headers,
            timeout=timeout,
        )
        return JobView.from_json(response.json(), created=response.status_code != 200)

    async def get(self, job_id: str) -> JobView:
        return JobView.from_json((await self._send("GET", f"/v1/jobs/{job_id}")).json())

    async def cancel(self, job_id: str) -> JobView:
        return JobView.from_json((await self._send("DELETE", f"/v1/jobs/{job_id}")).json())

    async def list(self, limit: int = 20, cursor: str | None = None) -> tuple[list[JobView], str | None]:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        page = (await self._send("GET", "/v1/jobs", params=params)).json()
        return [JobView.from_json(j) for j in page["jobs"]], page["next_cursor"]

    async def upload(self, data: bytes | str | Path) -> dict[str, str]:
        content = data if isinstance(data, bytes) else Path(data).read_bytes()
        headers = {"Content-Type": "application/octet-stream"}
        return (await self._send("POST", "/v1/uploads", content=content, headers=headers)).json()

    async def wait(
        self, job_id: str, timeout_s: float | None = None, on_progress: ProgressCallback | None = None
    ) -> JobView:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        record = await self.get(job_id)
        last_id = ""
        while not record.status.is_terminal():
            if on_progress is not None:
                on_progress(record)
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=self._stream_timeout(deadline),
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        _raise_for(response)
                    decoder = _SseDecoder()
                    async for line in response.aiter_lines():
                        event = decoder.feed(line)
                        if event is None:
                            continue
                        last_id = event.id
                        if event.name in _TERMINAL_EVENTS:
                            break
                        if event.name == "progress":
                            record = _apply(record, event)
                        else:
                            record = await self.get(job_id)
                        if on_progress is not None:
                            on_progress(record)
            except httpx.TransportError:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                record = await self.get(job_id)
                if not record.status.is_terminal():
                    raise WaitTimeout(f"job {job_id} is still {record.status.value} after {timeout_s} s")
            record = await self.get(job_id)
        return record

    async def result(self, job_id: str) -> list[Output]:
        return (await self.get(job_id)).result()

    async def download(self, job_id: str, directory: str | Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for output in await self.result(job_id):
            path = directory / f"{job_id}-{Path(output.key).name}"
            if output.url.startswith("file://"):
                shutil.copyfile(unquote(urlparse(output.url).path), path)
            else:
                async with self._downloads.stream("GET", output.url) as response:
                    if response.status_code != 200:
                        raise Unavailable(f"output {output.key}: HTTP {response.status_code}")
                    with path.open("wb") as file:
                        async for chunk in response.aiter_bytes():
                            file.write(chunk)
            paths.append(path)
        return paths

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._downloads.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise Unavailable(f"{method} {path}: {exc!r}") from exc
            else:
                if response.status_code not in _RETRIED_STATUS or attempt == self.max_retries:
                    return _raise_for(response)
            await asyncio.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")


def _raise_for(response: httpx.Response) -> httpx.Response:
    """The response when it is a success, else the ``FleetError`` its status and body say."""
    status = response.status_code
    if status < 400:
        return response
    try:
        body = response.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    message = str(detail or response.text or f"HTTP {status}")
    if status == 422 and isinstance(body, dict) and "errors" in body:
        raise InvalidRequest([FieldError(e["field"], e["message"]) for e in body["errors"]])
    raise {
        401: Unauthorized,
        404: NotFound,
        409: Conflict,
        429: TooManyJobs,
        503: Unavailable,
    }.get(status, FleetError)(message)


def _apply(record: JobView, event: _Event) -> JobView:
    return dataclasses.replace(
        record, status=JobStatus.RUNNING, step=event.data["step"], total_steps=event.data["total"]
    )


def _only_kind(model: str) -> str:
    # The API needs "kind"; like the Redis SDK, a model with one kind needs none from the caller.
    from routing.catalog import CATALOG

    spec = CATALOG.get(model)
    if spec is None or len(spec.task_kinds) != 1:
        return ""  # the API names the missing field
    return next(iter(spec.task_kinds)).value

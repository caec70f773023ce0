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
    │                      an unfinished job; delete() of one not ended
    ├── TooManyJobs        429 after the retries (each waits out ``Retry-After``; one past
    │                      ``max_retry_wait_s`` is raised at once)
    ├── OverBudget         402, at once: the tenant's GPU budget for this UTC month is used
    ├── Unavailable        503 after the retries, or the API could not be reached
    ├── JobNotSucceeded    result() of a job that failed or was canceled
    └── WaitTimeout        wait() ran out of time (the job goes on)

Only httpx and the contract's plain types are imported here: no Redis, no Celery, no boto3, no
PyAV, no Pillow. Both clients run the same flows of ``producer.protocol`` (requests, retries, error
mapping, the event stream); each does only the I/O.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from producer.api_keys import ApiKey
from producer.protocol import (
    Close,
    Core,
    Flow,
    JobView,
    NextLine,
    Open,
    ProgressCallback,
    Save,
    Send,
    Sleep,
    T,
)
from routing.errors import (
    Conflict,
    FieldError,
    FleetError,
    InvalidRequest,
    JobNotSucceeded,
    NotFound,
    OverBudget,
    TooManyJobs,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from routing.jobs.events import Webhook
from routing.jobs.record import JobStatus, Output
from routing.jobs.usage import Usage

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
    "OverBudget",
    "TooManyJobs",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "Webhook",
]


class Client:
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
        self._core = Core(
            base_url, api_key, timeout_s=timeout_s, max_retries=max_retries, max_retry_wait_s=max_retry_wait_s
        )
        self.base_url = self._core.base_url
        self._http = httpx.Client(timeout=timeout_s, transport=transport)
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
        return self._run(
            self._core.submit(request, idempotency_key, priority=priority, webhook=webhook, wait_s=wait_s)
        )

    def get(self, job_id: str) -> JobView:
        return self._run(self._core.get(job_id))

    def cancel(self, job_id: str) -> JobView:
        return self._run(self._core.cancel(job_id))

    def delete(self, job_id: str) -> None:
        """Delete an ended job now, rather than at its TTL: its files, then its record. Raises
        ``Conflict`` for a job not ended (cancel it first) and ``NotFound``."""
        self._run(self._core.delete(job_id))

    def list(
        self, limit: int = 20, cursor: str | None = None, order: str = "desc"
    ) -> tuple[list[JobView], str | None]:
        """The tenant's jobs, newest first (``order="asc"``: oldest first), and the cursor of
        the next page (None: the last), to pass back with the same ``order``."""
        return self._run(self._core.list(limit, cursor, order))

    def usage(self, start: dt.date | None = None, end: dt.date | None = None) -> Usage:
        """What the tenant used from ``start`` to ``end`` (UTC days, both included; by default
        its month to date): a row per day, model, class and end, and their totals."""
        return self._run(self._core.usage(start, end))

    def create_key(self, label: str = "") -> tuple[ApiKey, str]:
        """A new API key of the tenant: its listing, and the key (shown only here)."""
        return self._run(self._core.create_key(label))

    def list_keys(self) -> list[ApiKey]:
        """The keys the tenant made, oldest first (never the keys themselves)."""
        return self._run(self._core.list_keys())

    def revoke_key(self, key_id: str) -> None:
        """Revoke one of the tenant's keys: refused from the next request on."""
        self._run(self._core.revoke_key(key_id))

    def upload(self, data: bytes | str | Path) -> dict[str, str]:
        """Store an input file; returns ``{"key": ...}`` to put in a request."""
        return self._run(self._core.upload(_content(data)))

    def wait(
        self, job_id: str, timeout_s: float | None = None, on_progress: ProgressCallback | None = None
    ) -> JobView:
        """Follow the job's events until it ends; returns the whole record. ``on_progress`` gets
        the record at each event. Raises ``WaitTimeout`` after ``timeout_s``."""
        return self._run(self._core.wait(job_id, timeout_s, on_progress))

    def result(self, job_id: str) -> list[Output]:
        return self._run(self._core.result(job_id))

    def download(self, job_id: str, directory: str | Path) -> list[Path]:
        """Save a succeeded job's outputs into ``directory``; returns their paths."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        return self._run(self._core.download(job_id, Path(directory)))

    def close(self) -> None:
        self._http.close()
        self._downloads.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, flow: Flow[T]) -> T:
        """Do what ``flow`` asks until it returns."""
        answer: Any = None
        stream: httpx.Response | None = None
        lines: Iterator[str] = iter(())
        try:
            while True:
                try:
                    effect = flow.send(answer)
                except StopIteration as done:
                    return done.value
                answer = None
                match effect:
                    case Send(request):
                        try:
                            answer = self._http.send(request)
                        except httpx.TransportError as exc:
                            answer = exc
                    case Sleep(seconds):
                        time.sleep(seconds)
                    case Open(request):
                        if stream is not None:
                            stream.close()
                        try:
                            stream = answer = self._http.send(request, stream=True)
                            if stream.status_code != 200:
                                stream.read()
                            lines = stream.iter_lines()
                        except httpx.TransportError as exc:
                            answer = exc
                    case NextLine():
                        try:
                            answer = next(lines, None)
                        except httpx.TransportError as exc:
                            answer = exc
                    case Close():
                        if stream is not None:
                            stream.close()
                        stream = None
                    case Save(url, path, key):
                        if not _copied(url, path):
                            with self._downloads.stream("GET", url) as response:
                                _check_download(response, key)
                                with path.open("wb") as file:
                                    for chunk in response.iter_bytes():
                                        file.write(chunk)
        finally:
            if stream is not None:
                stream.close()
            flow.close()


class AsyncClient:
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
        self._core = Core(
            base_url, api_key, timeout_s=timeout_s, max_retries=max_retries, max_retry_wait_s=max_retry_wait_s
        )
        self.base_url = self._core.base_url
        self._http = httpx.AsyncClient(timeout=timeout_s, transport=transport)
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
        return await self._run(
            self._core.submit(request, idempotency_key, priority=priority, webhook=webhook, wait_s=wait_s)
        )

    async def get(self, job_id: str) -> JobView:
        return await self._run(self._core.get(job_id))

    async def cancel(self, job_id: str) -> JobView:
        return await self._run(self._core.cancel(job_id))

    async def delete(self, job_id: str) -> None:
        await self._run(self._core.delete(job_id))

    async def list(
        self, limit: int = 20, cursor: str | None = None, order: str = "desc"
    ) -> tuple[list[JobView], str | None]:
        return await self._run(self._core.list(limit, cursor, order))

    async def usage(self, start: dt.date | None = None, end: dt.date | None = None) -> Usage:
        return await self._run(self._core.usage(start, end))

    async def create_key(self, label: str = "") -> tuple[ApiKey, str]:
        return await self._run(self._core.create_key(label))

    async def list_keys(self) -> list[ApiKey]:
        return await self._run(self._core.list_keys())

    async def revoke_key(self, key_id: str) -> None:
        await self._run(self._core.revoke_key(key_id))

    async def upload(self, data: bytes | str | Path) -> dict[str, str]:
        return await self._run(self._core.upload(_content(data)))

    async def wait(
        self, job_id: str, timeout_s: float | None = None, on_progress: ProgressCallback | None = None
    ) -> JobView:
        return await self._run(self._core.wait(job_id, timeout_s, on_progress))

    async def result(self, job_id: str) -> list[Output]:
        return await self._run(self._core.result(job_id))

    async def download(self, job_id: str, directory: str | Path) -> list[Path]:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return await self._run(self._core.download(job_id, Path(directory)))

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._downloads.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self, flow: Flow[T]) -> T:
        answer: Any = None
        stream: httpx.Response | None = None
        lines: AsyncIterator[str] | None = None
        try:
            while True:
                try:
                    effect = flow.send(answer)
                except StopIteration as done:
                    return done.value
                answer = None
                match effect:
                    case Send(request):
                        try:
                            answer = await self._http.send(request)
                        except httpx.TransportError as exc:
                            answer = exc
                    case Sleep(seconds):
                        await asyncio.sleep(seconds)
                    case Open(request):
                        if stream is not None:
                            await stream.aclose()
                        try:
                            stream = answer = await self._http.send(request, stream=True)
                            if stream.status_code != 200:
                                await stream.aread()
                            lines = stream.aiter_lines()
                        except httpx.TransportError as exc:
                            answer = exc
                    case NextLine():
                        try:
                            answer = await anext(lines, None) if lines is not None else None
                        except httpx.TransportError as exc:
                            answer = exc
                    case Close():
                        if stream is not None:
                            await stream.aclose()
                        stream, lines = None, None
                    case Save(url, path, key):
                        if not _copied(url, path):
                            async with self._downloads.stream("GET", url) as response:
                                _check_download(response, key)
                                with path.open("wb") as file:
                                    async for chunk in response.aiter_bytes():
                                        file.write(chunk)
        finally:
            if stream is not None:
                await stream.aclose()
            flow.close()


def _content(data: bytes | str | Path) -> bytes:
    return data if isinstance(data, bytes) else Path(data).read_bytes()


def _copied(url: str, path: Path) -> bool:
    """Copies an output of the local store of a one-host set-up (``file://``); False for any other URL."""
    if not url.startswith("file://"):
        return False
    shutil.copyfile(unquote(urlparse(url).path), path)
    return True


def _check_download(response: httpx.Response, key: str) -> None:
    if response.status_code != 200:
        raise Unavailable(f"output {key}: HTTP {response.status_code}")

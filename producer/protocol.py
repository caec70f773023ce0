"""The HTTP SDK's core, without I/O: it builds the API's requests and reads its answers, error
bodies and event streams; ``producer.http`` runs it over httpx, synchronously or with asyncio.

Each verb is a generator (a "flow") that yields what it needs done and gets the outcome sent back:

    Send(request)    send one request; answer: the response, body read, or the ``httpx.TransportError``
    Sleep(seconds)   wait before a retry; answer: None
    Open(request)    open the job's event stream (a response other than 200 comes back read);
                     answer: the response or the ``httpx.TransportError``
    NextLine()       the stream's next line; answer: the line, None at its end, or the error
    Close()          close the stream
    Save(...)        fetch an output's URL into a file

A flow returns its result (``StopIteration.value``) and raises the fleet's errors itself, so the
sync and the async client share every decision: retries, error mapping, reconnects, parsing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from producer.api_keys import ApiKey, key_id
from routing.errors import (
    Conflict,
    FieldError,
    FleetError,
    InvalidRequest,
    NotFound,
    OverBudget,
    TooManyJobs,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from routing.jobs.events import Webhook
from routing.jobs.record import JobStatus, JobView, Output
from routing.jobs.usage import Usage

_RETRIED_STATUS = (429, 503)
_TERMINAL_EVENTS = ("succeeded", "failed", "canceled")


ProgressCallback = Callable[[JobView], None]


@dataclass(frozen=True)
class Send:
    request: httpx.Request


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Open:
    request: httpx.Request


@dataclass(frozen=True)
class NextLine:
    pass


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class Save:
    """Fetch ``url`` (presigned: no API key; or ``file://`` in a one-host set-up) into ``path``."""

    url: str
    path: Path
    key: str


Effect = Send | Sleep | Open | NextLine | Close | Save
T = TypeVar("T")
Flow = Generator[Effect, Any, T]


@dataclass(frozen=True)
class Event:
    id: str
    name: str
    data: dict[str, Any]


class SseDecoder:
    """Server-Sent Events, one line at a time (the subset the API sends: id, event, data)."""

    def __init__(self) -> None:
        self._id, self._name, self._data = "", "", []

    def feed(self, line: str) -> Event | None:
        if not line:
            event = Event(self._id, self._name, json.loads("\n".join(self._data))) if self._data else None
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


class Core:
    """The API's verbs as flows, for one base URL and API key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        max_retry_wait_s: float = 60.0,
    ):
        if not api_key:
            raise ValueError("an API key is needed (FLEET_API_KEY)")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._key_id = key_id(api_key)  # a made key's id: revoking it ends this client's access

    # The verbs.

    def submit(
        self,
        request: Mapping[str, Any],
        idempotency_key: str | None = None,
        *,
        priority: str = "normal",
        webhook: Webhook | None = None,
        wait_s: int | None = None,
    ) -> Flow[JobView]:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        timeout_s = self.timeout_s
        if wait_s:
            headers["Prefer"] = f"wait={wait_s}"
            timeout_s += wait_s
        body = submit_body(request, priority, webhook)
        response = yield from self._call(
            self.request("POST", "/v1/jobs", json=body, headers=headers, timeout=timeout_s)
        )
        return JobView.from_json(response.json(), created=response.status_code != 200)

    def get(self, job_id: str) -> Flow[JobView]:
        response = yield from self._call(self.request("GET", f"/v1/jobs/{job_id}"))
        return JobView.from_json(response.json())

    def cancel(self, job_id: str) -> Flow[JobView]:
        response = yield from self._call(self.request("DELETE", f"/v1/jobs/{job_id}"))
        return JobView.from_json(response.json())

    def delete(self, job_id: str) -> Flow[None]:
        # Sent again after a lost answer, it finds the job gone: the deletion it asked for.
        request = self.request("DELETE", f"/v1/jobs/{job_id}", params={"purge": "true"})
        yield from self._call(request, gone_after_lost={404})

    def list(
        self, limit: int = 20, cursor: str | None = None, order: str = "desc"
    ) -> Flow[tuple[list[JobView], str | None]]:
        params: dict[str, Any] = {"limit": limit, "order": order} | ({"cursor": cursor} if cursor else {})
        page = (yield from self._call(self.request("GET", "/v1/jobs", params=params))).json()
        return [JobView.from_json(j) for j in page["jobs"]], page["next_cursor"]

    def usage(self, start: dt.date | None = None, end: dt.date | None = None) -> Flow[Usage]:
        params = {name: day.isoformat() for name, day in (("start", start), ("end", end)) if day is not None}
        return Usage.from_json(
            (yield from self._call(self.request("GET", "/v1/usage", params=params))).json()
        )

    def create_key(self, label: str = "") -> Flow[tuple[ApiKey, str]]:
        # Sent once: a retry after a lost answer would make a second key.
        response = yield from self._call(self.request("POST", "/v1/keys", json={"label": label}), retry=False)
        made = response.json()
        return ApiKey.from_json(made), made["key"]

    def list_keys(self) -> Flow[list[ApiKey]]:
        listed = (yield from self._call(self.request("GET", "/v1/keys"))).json()
        return [ApiKey.from_json(k) for k in listed["keys"]]

    def revoke_key(self, key_id: str) -> Flow[None]:
        # Sent again after a lost answer, it finds the key gone (404), or, where it revoked the
        # key it calls with, is refused it (401): the revocation it asked for, either way.
        gone = {404, 401} if key_id == self._key_id else {404}
        yield from self._call(self.request("DELETE", f"/v1/keys/{key_id}"), gone_after_lost=gone)

    def upload(self, content: bytes) -> Flow[dict[str, str]]:
        headers = {"Content-Type": "application/octet-stream"}
        response = yield from self._call(
            self.request("POST", "/v1/uploads", content=content, headers=headers)
        )
        return response.json()

    def wait(
        self, job_id: str, timeout_s: float | None = None, on_progress: ProgressCallback | None = None
    ) -> Flow[JobView]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        record = yield from self.get(job_id)
        last_id = ""
        while not record.status.is_terminal():
            if on_progress is not None:
                on_progress(record)
            opened = yield Open(self._events_request(job_id, last_id, deadline))
            # A dropped stream, or one idle past the deadline, is reconnected from last_id.
            if not isinstance(opened, httpx.TransportError):
                if opened.status_code != 200:
                    raise_for(opened)
                decoder = SseDecoder()
                while True:
                    line = yield NextLine()
                    if line is None or isinstance(line, httpx.TransportError):
                        break
                    event = decoder.feed(line)
                    if event is None:
                        continue
                    last_id = event.id
                    if event.name in _TERMINAL_EVENTS:
                        break
                    if event.name == "progress":
                        record = apply_progress(record, event)
                    else:
                        record = yield from self.get(job_id)
                    if on_progress is not None:
                        on_progress(record)
                yield Close()
            if deadline is not None and time.monotonic() >= deadline:
                record = yield from self.get(job_id)
                if not record.status.is_terminal():
                    raise WaitTimeout(f"job {job_id} is still {record.status.value} after {timeout_s} s")
            record = yield from self.get(job_id)
        return record

    def result(self, job_id: str) -> Flow[list[Output]]:
        return (yield from self.get(job_id)).result()

    def download(self, job_id: str, directory: Path) -> Flow[list[Path]]:
        paths = []
        for output in (yield from self.result(job_id)):
            path = directory / f"{job_id}-{Path(output.key).name}"
            yield Save(output.url or "", path, output.key)
            paths.append(path)
        return paths

    # What the verbs are made of.

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | float | None = None,
    ) -> httpx.Request:
        """One request to the API, with the key and a timeout: ready to send as it is."""
        request = httpx.Request(
            method,
            self.base_url + path,
            params=params,
            json=json,
            content=content,
            headers=self._headers | dict(headers or {}),
        )
        request.extensions["timeout"] = httpx.Timeout(
            self.timeout_s if timeout is None else timeout
        ).as_dict()
        return request

    def _call(
        self, request: httpx.Request, *, retry: bool = True, gone_after_lost: set[int] | None = None
    ) -> Flow[httpx.Response]:
        # Every call may be sent again: reads, cancel and revoke are idempotent, a submit carries
        # its idempotency key, an upload stores the same bytes twice at worst. A new key is not.
        # ``gone_after_lost``: statuses that, after an attempt whose answer was lost, are that
        # attempt's deletion, not an error (a 404: what it deleted is gone).
        lost = False
        for attempt in range(self.max_retries + 1 if retry else 1):
            answer = yield Send(request)
            response = None
            if isinstance(answer, httpx.TransportError):
                lost = True
                if attempt == self.max_retries or not retry:
                    raise Unavailable(f"{request.method} {request.url.path}: {answer!r}") from answer
            else:
                response = answer
                if lost and response.status_code in (gone_after_lost or ()):
                    return response
                if (
                    response.status_code not in _RETRIED_STATUS
                    or attempt == self.max_retries
                    or not retry
                    or self._waits_too_long(response)
                ):
                    return raise_for(response)
            yield Sleep(self.retry_delay(attempt, response))
        raise AssertionError("unreachable")

    def _waits_too_long(self, response: httpx.Response) -> bool:
        """Whether the answer asks for a wait past ``max_retry_wait_s``: a retry sooner would be
        refused again, so the error is the caller's at once."""
        asked = _retry_after_s(response)
        return asked is not None and asked > self.max_retry_wait_s

    def retry_delay(self, attempt: int, response: httpx.Response | None) -> float:
        asked = _retry_after_s(response) if response is not None else None
        if asked is not None:
            return asked  # at most max_retry_wait_s: a longer one is not waited for
        return random.uniform(0, min(self.max_retry_wait_s, 0.5 * 2**attempt))  # full jitter

    def _events_request(self, job_id: str, last_id: str, deadline: float | None) -> httpx.Request:
        # An idle stream gets a keepalive comment every FLEET_EVENTS_KEEPALIVE_S (15 s): a read
        # that waits far longer is a dead connection.
        read_s = 120.0 if deadline is None else max(0.01, deadline - time.monotonic())
        headers = {"Last-Event-ID": last_id} if last_id else {}
        timeout = httpx.Timeout(self.timeout_s, read=read_s)
        return self.request("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout)


def submit_body(request: Mapping[str, Any], priority: str, webhook: Webhook | None) -> dict[str, Any]:
    """The body of ``POST /v1/jobs``: the request, its kind, and the options that are not defaults."""
    body = dict(request)
    if "kind" not in body:
        body["kind"] = _only_kind(str(body.get("model", "")))
    if priority != "normal":
        body["priority"] = priority
    if webhook is not None:
        body["webhook"] = {"url": webhook.url, "events": list(webhook.events)}
    return body


def _retry_after_s(response: httpx.Response) -> float | None:
    """The seconds an answer's ``Retry-After`` asks for (the fleet sends whole seconds)."""
    retry_after = response.headers.get("Retry-After", "")
    return float(retry_after) if retry_after.isdigit() else None


def raise_for(response: httpx.Response) -> httpx.Response:
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
    if status == 402:
        asked = _retry_after_s(response)
        raise OverBudget(message, time.time() + asked if asked is not None else None)
    raise {
        401: Unauthorized,
        404: NotFound,
        409: Conflict,
        429: TooManyJobs,
        503: Unavailable,
    }.get(status, FleetError)(message)


def apply_progress(record: JobView, event: Event) -> JobView:
    return dataclasses.replace(
        record,
        status=JobStatus.RUNNING,
        step=event.data["step"],
        total_steps=event.data["total"],
        stage=event.data.get("stage"),
    )


def _only_kind(model: str) -> str:
    # The API needs "kind"; like the Redis SDK, a model with one kind needs none from the caller.
    from routing.catalog import CATALOG

    spec = CATALOG.get(model)
    if spec is None or len(spec.task_kinds) != 1:
        return ""  # the API names the missing field
    return next(iter(spec.task_kinds)).value

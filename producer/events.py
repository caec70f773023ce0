"""A job's live events for the HTTP API: ``GET /v1/jobs/{id}/events`` (Server-Sent Events) and the
wait behind ``Prefer: wait=N`` on ``POST /v1/jobs``.

Both read the job's own stream (``Keys.job_events``), which the same Lua step that changes the
record writes, with blocking XREAD on an asyncio Redis client: a waiting stream holds a socket,
not a thread, and nothing reads the record in a loop. An SSE event's ``id`` is its stream entry
id, so a client that reconnects with ``Last-Event-ID`` gets every later event once.

    id: 1733236800000-0
    event: progress
    data: {"job_id": "...", "status": "running", "at": 1733236800.0, "step": 3, "total": 8}

A progress event of the work before the denoising steps names its stage (``"stage":
"preprocess.pose"``: Animate's preprocessing, its step and total frames or videos).

Event names are ``queued``, ``started``, ``progress``, ``succeeded``, ``failed``, ``canceled``;
the stream ends after the terminal one, or after an ``error`` event when the job store fails. A
comment line (``: keepalive``) goes out when nothing happened for ``events_keepalive_s``, so
proxies keep the connection open.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from routing.errors import FieldError, InvalidRequest
from routing.io.connection import connect_async
from routing.jobs.events import EventType
from routing.jobs.keys import Keys
from routing.jobs.record import JobStatus
from routing.settings import Settings

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELED})
EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
_READ_COUNT = 200


@dataclass(frozen=True)
class Event:
    id: str  # the stream entry id: what Last-Event-ID names
    type: EventType
    data: dict[str, object]

    @property
    def name(self) -> str:
        return self.type.value.removeprefix("job.")

    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    def sse(self) -> str:
        return f"id: {self.id}\nevent: {self.name}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n"


class JobEvents:
    """Reads jobs' own event streams. One per API process; its Redis connections are made in the
    server's event loop on first use."""

    def __init__(self, settings: Settings, keys: Keys, keepalive_s: float, max_connections: int = 50):
        self.settings = settings
        self._redis: aioredis.Redis | None = None
        self.keys = keys
        self.keepalive_s = keepalive_s
        # Every open stream and every Prefer: wait holds one connection while it blocks: the API
        # bounds those (producer/admission.py) and sizes the pool above their sum, so a short read
        # waits briefly for a connection rather than failing.
        self.max_connections = max_connections

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            # Reads block up to keepalive_s: a socket silent well past that is a dead connection.
            self._redis = connect_async(
                self.settings,
                max_connections=self.max_connections,
                timeout_s=10,
                socket_timeout_s=self.keepalive_s + 10,
                follow=True,
            )
        return self._redis

    async def tenant_of(self, job_id: str) -> str | None:
        """The job's tenant, None when there is no such job."""
        tenant = await self.redis.hget(self.keys.job(job_id), "tenant")
        return tenant.decode() if tenant is not None else None

    async def follow(self, job_id: str, after: str = "0-0") -> AsyncIterator[Event | None]:
        """The job's events after stream id ``after``, as they happen, ending with the terminal
        one; None each time ``keepalive_s`` passes without an event."""
        last = after
        if await self._finished(job_id):
            for event in await self._read(job_id, last, block_ms=None):
                yield event
            return
        while True:
            events = await self._read(job_id, last, block_ms=int(self.keepalive_s * 1000))
            if not events:
                if await self._finished(job_id):
                    # The terminal event is written in the same step as the status: read what
                    # arrived since the blocking read gave up, then end.
                    for event in await self._read(job_id, last, block_ms=None):
                        yield event
                    return
                yield None
                continue
            for event in events:
                yield event
                if event.is_terminal():
                    return
                last = event.id

    async def sse(self, job_id: str, after: str = "0-0") -> AsyncIterator[str]:
        """``follow`` as the text of an ``text/event-stream`` response. Should Redis fail mid-stream
        (whatever its error), the stream ends with an ``error`` event, not a dropped connection;
        the client resumes from its ``Last-Event-ID``."""
        try:
            async for event in self.follow(job_id, after):
                yield event.sse() if event is not None else ": keepalive\n\n"
        except redis.RedisError as exc:
            log.warning("events of job %s: the job store failed mid-stream: %s", job_id, exc)
            data = {"job_id": job_id, "detail": "the job store is unavailable; reconnect with Last-Event-ID"}
            yield f"event: error\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    async def wait_finished(self, job_id: str, timeout_s: float) -> bool:
        """Whether the job ends within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = "0-0"
        while True:
            if await self._finished(job_id):
                return True
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return False
            block_ms = min(left_ms, int(self.keepalive_s * 1000))
            for event in await self._read(job_id, last, block_ms=block_ms):
                if event.is_terminal():
                    return True
                last = event.id

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def _finished(self, job_id: str) -> bool:
        status = await self.redis.hget(self.keys.job(job_id), "status")
        return status is None or JobStatus(status.decode()).is_terminal()

    async def _read(self, job_id: str, after: str, block_ms: int | None) -> list[Event]:
        stream = self.keys.job_events(job_id)
        reply = await self.redis.xread({stream: after}, count=_READ_COUNT, block=block_ms)
        events = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                raw = {k.decode(): v.decode() for k, v in fields.items()}
                data: dict[str, object] = {"job_id": job_id, "status": raw["status"], "at": float(raw["at"])}
                if "step" in raw:
                    data |= {"step": int(raw["step"]), "total": int(raw["total"])}
                if "stage" in raw:
                    data["stage"] = raw["stage"]
                events.append(Event(entry_id.decode(), EventType(raw["type"]), data))
        return events


def prefer_wait_s(prefer: str | None, max_wait_s: int) -> int:
    """Seconds asked for by a ``Prefer: wait=N`` header (RFC 7240; other preferences are
    ignored), 0 when none; bare ``wait`` means the longest allowed."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not value:
            return max_wait_s
        if not value.isdigit() or not 1 <= int(value) <= max_wait_s:
            raise InvalidRequest(
                [FieldError("Prefer", f"wait must be whole seconds from 1 to {max_wait_s} (got {value!r})")]
            )
        return int(value)
    return 0

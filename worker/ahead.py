"""Decode-ahead: while the GPU generates one job, fetch and decode the input media of the job
at the head of this worker's queues.

Nothing is taken from a queue: the message stays where it is, so priorities decide what runs
next as before (a high job that arrives later is taken first, and the low job's decoded inputs
wait, or go unused if another worker takes it). At most two jobs' inputs are held.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis

from routing.jobs.messages import task_id

log = logging.getLogger(__name__)


def peek_next(client: redis.Redis, queues: Sequence[str]) -> str | None:
    """The id of the task the worker would take next: Kombu's Redis transport pushes on the
    left and pops from the right of each queue's list, and the worker polls ``queues`` in order."""
    for name in queues:
        raw = client.lindex(name, -1)
        if raw is None:
            continue
        try:
            return task_id(raw)
        except ValueError:
            return None
    return None


class DecodeAhead:
    """Decodes ahead for at most ``keep`` jobs (the newest kept): enough for a low job decoded
    ahead to survive a high one that passes it."""

    def __init__(
        self,
        peek: Callable[[], str | None],
        decode: Callable[[str], Any],
        keep: int = 2,
        every_s: float = 0.5,
    ):
        """``decode(job_id)`` returns the job's decoded inputs, or None when it has no media."""
        self._peek = peek
        self._decode = decode
        self._keep = keep
        self._every_s = every_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-ahead")
        self._ahead: OrderedDict[str, Future[Any]] = OrderedDict()
        self._peeked_at = 0.0

    def kick(self, running: str, *, now: bool = False) -> None:
        """``running`` is generating: decode the next job's inputs meanwhile. Called when the
        pipeline call starts (``now``) and at every step (then at most every ``every_s``)."""
        if not now and time.monotonic() - self._peeked_at < self._every_s:
            return
        self._peeked_at = time.monotonic()
        try:
            job_id = self._peek()
        except redis.RedisError:
            return
        if job_id is None or job_id == running or job_id in self._ahead:
            return
        self._ahead[job_id] = self._executor.submit(self._decode, job_id)
        while len(self._ahead) > self._keep:
            self._ahead.popitem(last=False)

    def take(self, job_id: str) -> Any:
        """The inputs decoded ahead for ``job_id`` (waiting for a decode under way), or None."""
        future = self._ahead.pop(job_id, None)
        if future is None:
            return None
        try:
            return future.result()
        except Exception:  # decoded again in the job itself, where an error is the job's result
            log.warning("decoding ahead for job %s failed; decoding it again", job_id, exc_info=True)
            return None

"""The finish stage of a job (encode, store, record) on a thread of its own, so that the GPU
generates the next job meanwhile.

Bounded: at most ``depth`` generated jobs wait here or are being finished; a job handed over
while all are taken waits for one to end (a slow store slows generation instead of filling
memory). ``depth`` 0 finishes each job on the caller's thread, before it takes the next.

What a kill costs: a job in here is still ``running`` in its record, owned by this process. If
the process dies, the reaper of any live worker finds the owner gone and hands the job back to
its queue; it runs again as the next attempt, stores under that attempt's keys, and its success
deletes what the dead process may have half-written. No job is lost and none gets a second
output. A process that was only thought dead (stopped, cut off) and finishes after all cannot
record its outputs: the finish checks the worker and the attempt, and on refusal it deletes what
it stored.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Finisher:
    def __init__(self, depth: int):
        self.depth = depth
        self._slots = threading.BoundedSemaphore(max(depth, 1))
        self._work: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._pending = 0

    def submit(self, finish: Callable[[], T]) -> T | None:
        """Run ``finish`` (which must record the job's outcome itself, whatever happens); what it
        returned when ``depth`` is 0 (run here), else None (it runs on the finisher's thread)."""
        if self.depth == 0:
            return finish()
        self._slots.acquire()  # blocks while `depth` jobs are still finishing
        with self._idle:
            self._pending += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="finisher", daemon=True)
            self._thread.start()
        self._work.put(finish)
        return None

    def _loop(self) -> None:
        while (finish := self._work.get()) is not None:
            try:
                finish()
            except Exception:  # the job stays running; the reaper hands it back if we die
                log.exception("finishing a job failed")
            finally:
                self._slots.release()
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Until every job handed over is finished; False if ``timeout_s`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

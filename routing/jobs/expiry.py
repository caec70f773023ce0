"""Expiry of queued jobs that no worker took in time, whether or not their class has a worker.

A worker expires a job it claims too late, but a job on a class with no live worker is never
claimed: it would stay queued, holding its tenant's in-flight slot, for ever. So every process
that is always up sweeps: the API process from a thread, each worker from its liveness loop. A
sweep reads the store's waiting index (queued jobs by ``created_at``) and fails what is past
``max_wait_s`` (``JobStore.expire_queued``); each job's transition is atomic and only from
``queued``, so sweepers running at once expire each job once.

The same sweep ends jobs still ``running`` long past the hard time limit (``FLEET_MAX_RUN_S``
plus ``FINISH_GRACE_S`` for encoding and storing its outputs), whatever their worker's state: a
worker that lives but cannot write the job's end (Redis read only or out of memory for longer
than it retries) has already acknowledged its message, and the reaper only asks whether the
worker is alive, so without this the job would stay ``running`` and hold its tenant's slot for ever.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from routing.jobs.store import JobStore

log = logging.getLogger(__name__)

# After the hard time limit, how long a job's outputs may still take to be encoded and stored
# (that runs on the worker's finisher thread, after its task returned).
FINISH_GRACE_S = 600.0


class ExpirySweep:
    """Expires the jobs queued longer than ``max_wait_s``, and ends those running longer than
    ``max_run_s`` plus ``FINISH_GRACE_S`` (when given), every ``interval_s``."""

    def __init__(self, store: JobStore, max_wait_s: float, interval_s: float, max_run_s: float | None = None):
        self.store = store
        self.max_wait_s = max_wait_s
        self.interval_s = interval_s
        self.longest_run_s = None if max_run_s is None else max_run_s + FINISH_GRACE_S
        self._last = float("-inf")

    def maybe_sweep(self) -> list[str]:
        """Sweep if ``interval_s`` has passed since the last sweep (for a loop that runs more
        often); the ids expired."""
        if time.monotonic() - self._last < self.interval_s:
            return []
        return self.sweep()

    def sweep(self) -> list[str]:
        self._last = time.monotonic()
        expired = self.store.expire_queued(self.max_wait_s)
        if expired:
            log.warning("expired %d jobs queued longer than %s s", len(expired), self.max_wait_s)
        if self.longest_run_s is not None:
            overdue = self.store.time_out_overdue(self.longest_run_s)
            if overdue:
                log.warning(
                    "ended %d jobs running longer than %s s: %s", len(overdue), self.longest_run_s, overdue
                )
            expired += overdue
        return expired

    def start(self) -> threading.Event:
        """Sweep every ``interval_s`` from a daemon thread until the returned event is set."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    self.sweep()
                except redis.RedisError:
                    log.warning("expiry sweep failed; retrying", exc_info=True)
                stop.wait(self.interval_s)

        threading.Thread(target=loop, name="expiry-sweep", daemon=True).start()
        return stop

"""GPU-busy share: seconds a worker's GPU spent inside pipeline calls, out of its wall time with
work queued for the GPU.

"Work queued for the GPU" is every moment a job the worker claimed had not yet left its pipeline
call (overlapped jobs counted once), plus every moment between two such jobs while the job taken
next was already waiting in its queue: the encode and store of job N count while job N+1 waits
for them (the waste overlap removes), but a worker idle for want of jobs does not, nor does the
encode of a backlog's last job, when nothing is queued that the GPU could run instead. The share
is what the fleet pays for: GPU hours spent outside pipeline calls while work waits are bought and
unused.

Each worker process keeps one meter; its totals ride in the heartbeat (``gpu_busy_s``,
``gpu_work_s``) for Prometheus and Flower, and every job's end adds the new seconds to its class's
totals in Redis (``metrics:gpu_busy``), which the capacity planner reads.
"""

from __future__ import annotations

import threading
import time


class BusyMeter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = 0  # jobs claimed and not yet out of their pipeline call
        self._held_since = 0.0
        self._idle_since = time.time()
        self._busy_s = 0.0
        self._work_s = 0.0
        self._flushed = (0.0, 0.0)

    def job_started(self, claimed_at: float, waiting_since: float) -> None:
        """A job was claimed at ``claimed_at``; it had been waiting since ``waiting_since``."""
        with self._lock:
            if self._held == 0:
                self._work_s += max(0.0, claimed_at - max(self._idle_since, waiting_since))
                self._held_since = claimed_at
            self._held += 1

    def gpu_done(self, now: float | None = None) -> None:
        """A claimed job is done with the GPU: its pipeline call returned, or it ended (failed,
        canceled, handed on) before reaching it. Its encode and store are CPU work."""
        with self._lock:
            self._held -= 1
            if self._held == 0:
                now = time.time() if now is None else now
                self._work_s += now - self._held_since
                self._idle_since = now

    def pipeline(self, seconds: float) -> None:
        """A pipeline call (the GPU's work) took ``seconds``."""
        with self._lock:
            self._busy_s += seconds

    def totals(self) -> tuple[float, float]:
        """(busy seconds, seconds with work) since the process started."""
        with self._lock:
            held = time.time() - self._held_since if self._held else 0.0
            return self._busy_s, self._work_s + held

    def take_new(self, now: float | None = None) -> tuple[float, float]:
        """Busy and work seconds added since the last call, up to now (a stretch of work under
        way is counted so far and goes on from here)."""
        with self._lock:
            if self._held:
                now = time.time() if now is None else now
                self._work_s += now - self._held_since
                self._held_since = now
            busy, work = self._busy_s - self._flushed[0], self._work_s - self._flushed[1]
            self._flushed = (self._busy_s, self._work_s)
            return busy, work


def share(busy_s: float, work_s: float) -> float | None:
    return round(busy_s / work_s, 4) if work_s > 0 else None

"""A rank's own error mid-job, written into the job's directory for the supervisor to read.

A rank whose code raises writes ``rank-N.error`` before it joins the exchange of outcomes. If the
other ranks are waiting for it inside the model's own collectives, nothing but the collective
timeout would end their wait; so the supervisor watches the job's directory, and once an error
file has gone unanswered for the grace period it kills the group naming that error.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

RANK_ERROR_GLOB = "rank-*.error"


def write_error(jobdir: Path, rank: int, message: str) -> None:
    """Rank side: leave ``message`` where the supervisor finds it."""
    path = jobdir / f"rank-{rank}.error"
    try:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(message[:2000])
        temporary.rename(path)  # the supervisor never reads half a message
    except OSError as exc:
        log.warning("rank %d: could not write %s: %s", rank, path, exc)


class RankErrorWatcher:
    """Supervisor side: the error files of one running job, and how long the first has waited."""

    def __init__(self, jobdir: Path, grace_s: float):
        self.jobdir = jobdir
        self.grace_s = grace_s
        self._seen_at: float | None = None

    def overdue(self) -> bool:
        """True once a rank's error has gone unanswered for longer than the grace."""
        if self._seen_at is None:
            if next(self.jobdir.glob(RANK_ERROR_GLOB), None) is not None:
                self._seen_at = time.monotonic()
            return False
        return time.monotonic() - self._seen_at > self.grace_s

    def read(self) -> str:
        """'rank 1: RuntimeError: ...' for each error file the job's ranks wrote."""
        found = []
        for path in sorted(self.jobdir.glob(RANK_ERROR_GLOB)):
            try:
                found.append(f"{path.stem.replace('-', ' ')}: {path.read_text(errors='replace').strip()}")
            except OSError:
                continue
        return "; ".join(found)

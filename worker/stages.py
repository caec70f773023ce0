"""Which reports of the work before the denoising steps become progress events.

Preprocessing reports every frame (``ProgressCallback``); a long video would make an event of
each. ``Throttle`` lets through the first report of each stage and then one per ``interval_s``;
the worker asks the rest only whether to stop (``JobStore.check``), so a cancel still ends the
work at the next frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._stage: str | None = None
        self._at = 0.0

    def due(self, stage: str) -> bool:
        """Whether this report of ``stage`` goes out as an event."""
        now = self.clock()
        if stage == self._stage and now - self._at < self.interval_s:
            return False
        self._stage, self._at = stage, now
        return True

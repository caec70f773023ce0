"""Object stores with faults, for the tests and benchmarks that need a worker whose store is slow.

``SlowStorage`` waits ``FAULT_STORE_PUT_S`` seconds (from the worker's environment) before every
``put``, and logs when each put starts and when it returns (``time.time()``), so a test can tell
what the worker did while a store was under way. A worker gets it by being started as
``python -m testkit.slow_worker`` (``SLOW_WORKER``: the module ``WorkerProcess`` runs) instead of
``python -m worker``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from routing.io.storage import Storage, make_storage
from routing.settings import Settings

log = logging.getLogger(__name__)

SLOW_WORKER = "testkit.slow_worker"


class SlowStorage:
    def __init__(self, storage: Storage):
        self._storage = storage
        self.delay_s = float(os.environ.get("FAULT_STORE_PUT_S", "0"))

    def put(self, key: str, data: bytes, content_type: str) -> Any:
        log.warning("slow store: put %s started", key)
        time.sleep(self.delay_s)
        stored = self._storage.put(key, data, content_type)
        log.warning("slow store: put %s returned at %r", key, time.time())
        return stored

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def slow_storage(settings: Settings) -> Storage:
    """The configured store, behind ``SlowStorage``."""
    return SlowStorage(make_storage(settings))  # type: ignore[return-value]

"""A slow object store for tests: every ``put`` waits ``FAULT_STORE_PUT_S`` seconds (from the
worker's environment) before writing. Loaded in the worker through ``settings.storage_wrapper``::

    settings.storage_wrapper = "tests.faults.storage:SlowStorage"

It logs when each put starts and when it returns (``time.time()``), so a test can tell what the
worker did while a store was under way.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from routing.io.storage import Storage

log = logging.getLogger(__name__)

SLOW_STORAGE = "tests.faults.storage:SlowStorage"


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

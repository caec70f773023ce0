"""Per-tenant bounds on work an API process does at once for one tenant (submits that download,
uploads): the excess is refused with 429 at once, not queued behind the tenant's own work."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SlotsTaken(Exception):
    """All of a tenant's slots are held: the API answers 429 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TenantSlots:
    """At most ``limit`` of one tenant's ``what`` at once in this process."""

    def __init__(self, limit: int, what: str, setting: str, retry_after_s: int = 5):
        self.limit = limit
        self.what = what
        self.setting = setting
        self.retry_after_s = retry_after_s
        self._taken: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def take(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s slots; raises ``SlotsTaken`` when all are held."""
        with self._lock:
            if self._taken.get(tenant, 0) >= self.limit:
                raise SlotsTaken(
                    f"at most {self.limit} {self.what} of one tenant at once ({self.setting}); retry later",
                    self.retry_after_s,
                )
            self._taken[tenant] = self._taken.get(tenant, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._taken[tenant] -= 1
                if not self._taken[tenant]:
                    del self._taken[tenant]

    def held(self, tenant: str) -> int:
        return self._taken.get(tenant, 0)

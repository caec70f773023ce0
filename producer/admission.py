"""What the HTTP API admits from one tenant before doing the work: submits and cancels per
window (counted in Redis, so every API process shares them), and the open event streams and
``Prefer: wait`` submits one API process holds, per tenant and in all (counted in the process:
each holds a connection of that process's Redis pool, which is sized from the same settings).

Each refusal says when to come back (``Retry-After``), so the HTTP SDK's retries wait it out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from routing.jobs.keys import Keys

# Counts one action when the window's count is under the limit; else the seconds until the
# window ends. KEYS: the counter. ARGV: limit, window.
_TAKE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then
  return math.max(redis.call('TTL', KEYS[1]), 1)
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2], 'NX')
return 0
"""


class RateLimits:
    """Fixed windows per tenant and action: ``take`` counts one and says how long to wait when
    the window is full (a refused action is not counted)."""

    def __init__(self, client: redis.Redis, keys: Keys, window_s: int, limits: dict[str, int]):
        self._take = client.register_script(_TAKE)
        self.keys = keys
        self.window_s = window_s
        self.limits = limits

    def take(self, action: str, tenant: str) -> int | None:
        """None when ``tenant`` may ``action`` now, else the seconds to wait."""
        wait_s = self._take(keys=[self.keys.rate(action, tenant)], args=[self.limits[action], self.window_s])
        return int(wait_s) or None


class SlotsTaken(Exception):
    """All the slots a caller may hold are held: the API answers 429 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Slot:
    """One held place of ``Slots``; ``release`` gives it back, once however often it is called."""

    def __init__(self, slots: Slots, tenant: str):
        self._slots: Slots | None = slots
        self.tenant = tenant

    def release(self) -> None:
        if self._slots is not None:
            self._slots._give_back(self.tenant)
            self._slots = None


class Slots:
    """At most ``per_tenant`` of ``what`` held by one tenant and ``total`` (None: no bound) by the
    process. Used from the server's event loop only, so the counts need no lock. ``setting``
    names what a refusal tells the caller to look at."""

    def __init__(self, per_tenant: int, total: int | None, what: str, setting: str):
        self.per_tenant = per_tenant
        self.total = total
        self.what = what
        self.setting = setting
        self._held: Counter[str] = Counter()

    def take(self, tenant: str) -> Slot:
        """A slot for ``tenant``; raises ``SlotsTaken`` when the tenant or the process holds all
        it may."""
        if self._held[tenant] >= self.per_tenant:
            raise SlotsTaken(f"at most {self.per_tenant} {self.what} of one tenant at once ({self.setting})")
        if self.total is not None and self._held.total() >= self.total:
            raise SlotsTaken(f"at most {self.total} {self.what} at once in this API process ({self.setting})")
        self._held[tenant] += 1
        return Slot(self, tenant)

    @contextmanager
    def holding(self, tenant: str) -> Iterator[None]:
        """``take`` for the length of a block."""
        slot = self.take(tenant)
        try:
            yield
        finally:
            slot.release()

    def held(self, tenant: str | None = None) -> int:
        return self._held.total() if tenant is None else self._held[tenant]

    def _give_back(self, tenant: str) -> None:
        self._held[tenant] -= 1
        if self._held[tenant] <= 0:
            del self._held[tenant]

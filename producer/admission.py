"""What the HTTP API admits from one tenant before doing the work: submits and cancels per
window (counted in Redis, so every API process shares them), and the open event streams and
``Prefer: wait`` submits one API process holds, per tenant and in all (counted in the process:
each holds a connection of that process's Redis pool, which is sized from the same settings).

Each refusal says when to come back (``Retry-After``), so the HTTP SDK's retries wait it out.
"""

from __future__ import annotations

from collections import Counter

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
    """At most ``per_tenant`` held by one tenant and ``total`` by the process. Used from the
    server's event loop only, so the counts need no lock."""

    def __init__(self, per_tenant: int, total: int):
        self.per_tenant = per_tenant
        self.total = total
        self._held: Counter[str] = Counter()

    def take(self, tenant: str) -> Slot | None:
        """A slot for ``tenant``, or None when the tenant or the process holds all it may."""
        if self._held[tenant] >= self.per_tenant or self._held.total() >= self.total:
            return None
        self._held[tenant] += 1
        return Slot(self, tenant)

    def held(self, tenant: str | None = None) -> int:
        return self._held.total() if tenant is None else self._held[tenant]

    def _give_back(self, tenant: str) -> None:
        self._held[tenant] -= 1
        if self._held[tenant] <= 0:
            del self._held[tenant]

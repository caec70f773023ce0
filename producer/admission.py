"""What the HTTP API admits from one tenant before doing the work: submits and cancels per
window (counted in Redis, so every API process shares them).

Each refusal says when to come back (``Retry-After``), so the HTTP SDK's retries wait it out.
"""

from __future__ import annotations

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

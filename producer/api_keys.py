"""API keys a tenant makes and revokes itself (``POST``/``GET``/``DELETE /v1/keys``; ops use
``python -m producer keys`` over Redis), beside the keys ``FLEET_TENANTS`` names.

A key is ``fk_<id>_<secret>``: a 12-hex id (what lists and revocations name) and 32 random bytes.
Redis keeps only the key's SHA-256 (``Keys.api_key``: digest -> ``<tenant> <id>``) and the
tenant's list (``Keys.tenant_api_keys``: id -> digest, label, creation time); the key itself is
shown once, when it is made. Each request looks its key up by digest, so a revoked key is refused
from the next request on, in every API process. A key's tenant must still be in ``FLEET_TENANTS``
(its limits and webhook secret are there): a tenant taken out of the settings has no working key.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from routing.errors import Conflict, NotFound
from routing.jobs.keys import Keys

if TYPE_CHECKING:  # the HTTP SDK reads ApiKey with no Redis client installed
    import redis

    from routing.io.connection import Replication

PREFIX = "fk_"
_KEY = re.compile(r"fk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
_ID = re.compile(r"[0-9a-f]{12}")
MAX_LABEL = 100

# keys: record (template, by digest), list.  id, digest, tenant, entry (JSON), max. Returns 1, or
# 0 when the tenant has max keys already.
_CREATE = """
local a = cjson.decode(ARGV[1])
if redis.call('HLEN', a.keys.list) >= tonumber(a.max) then return 0 end
redis.call('SET', a.keys.record[1] .. a.digest .. a.keys.record[2], a.tenant .. ' ' .. a.id)
redis.call('HSET', a.keys.list, a.id, a.entry)
return 1
"""

# keys: record (template, by digest), list.  id. Returns 1, or 0 when the tenant has no such key.
_REVOKE = """
local a = cjson.decode(ARGV[1])
local entry = redis.call('HGET', a.keys.list, a.id)
if not entry then return 0 end
redis.call('DEL', a.keys.record[1] .. cjson.decode(entry).digest .. a.keys.record[2])
redis.call('HDEL', a.keys.list, a.id)
return 1
"""


@dataclass(frozen=True)
class ApiKey:
    """A key as lists show it: never the key itself."""

    id: str
    label: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "created_at": self.created_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ApiKey:
        return cls(data["id"], data["label"], data["created_at"])


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_managed(key: str) -> bool:
    """Whether ``key`` has the form of a key this module makes (only those are looked up)."""
    return _KEY.fullmatch(key) is not None


def key_id(key: str) -> str | None:
    """The id of a key this module makes (what lists and revocations name), else None."""
    found = _KEY.fullmatch(key)
    return found.group(1) if found else None


class ApiKeys:
    """The managed keys in Redis. Safe to share between threads."""

    def __init__(
        self, client: redis.Redis, keys: Keys, max_per_tenant: int, replication: Replication | None = None
    ):
        self.client = client
        self.keys = keys
        self.max_per_tenant = max_per_tenant
        if replication is None:
            from routing.io.connection import Replication  # imports redis: not at the HTTP SDK's import

            replication = Replication()
        # Replicas that must hold a new key before it is handed out (FLEET_REDIS_MIN_REPLICAS).
        self.replication = replication
        self._create = client.register_script(_CREATE)
        self._revoke = client.register_script(_REVOKE)

    def create(self, tenant: str, label: str = "") -> tuple[ApiKey, str]:
        """A new key of ``tenant``: its listing and the key, which nothing keeps. Raises
        ``Conflict`` when the tenant has ``max_per_tenant`` keys already."""
        key_id = uuid.uuid4().hex[:12]
        key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        made = ApiKey(key_id, label[:MAX_LABEL], round(time.time(), 3))
        entry = json.dumps({"digest": digest(key), "label": made.label, "created_at": made.created_at})
        args = {
            "keys": {
                "record": self.keys.template(self.keys.api_key),
                "list": self.keys.tenant_api_keys(tenant),
            },
            "id": key_id,
            "digest": digest(key),
            "tenant": tenant,
            "entry": entry,
            "max": str(self.max_per_tenant),
        }
        (created,), held = self.replication.run(self.client, self._create, [json.dumps(args)])
        self.replication.warn_if_short(held, f"key {key_id} of tenant {tenant!r}")
        if not created:
            raise Conflict(
                f"tenant {tenant!r} has {self.max_per_tenant} keys (FLEET_MAX_KEYS_PER_TENANT); revoke one first"
            )
        return made, key

    def list(self, tenant: str) -> list[ApiKey]:
        """The tenant's keys, oldest first."""
        found = []
        for key_id, raw in self.client.hgetall(self.keys.tenant_api_keys(tenant)).items():
            entry = json.loads(raw)
            found.append(ApiKey(_text(key_id), entry["label"], entry["created_at"]))
        return sorted(found, key=lambda k: (k.created_at, k.id))

    def revoke(self, tenant: str, key_id: str) -> None:
        """Revoke one of the tenant's keys: refused from the next request on. Raises
        ``NotFound`` when the tenant has no key ``key_id`` (another tenant's reads the same)."""
        args = {
            "keys": {
                "record": self.keys.template(self.keys.api_key),
                "list": self.keys.tenant_api_keys(tenant),
            },
            "id": key_id,
        }
        if not _ID.fullmatch(key_id) or not self._revoke(args=[json.dumps(args)]):
            raise NotFound(f"no key {key_id}")

    def tenant_of(self, key: str) -> str | None:
        """The tenant of a managed key, or None (not one, or revoked)."""
        if not is_managed(key):
            return None
        found = self.client.get(self.keys.api_key(digest(key)))
        return _text(found).split(" ", 1)[0] if found else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

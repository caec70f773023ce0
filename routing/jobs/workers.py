"""The worker registry: every worker process beats a heartbeat naming its class, with what it
holds (resident models, GPU memory); a worker whose heartbeat expired is gone. ETA, the metrics and
the reaper read it, through an index of worker names (never a scan of the keyspace)."""

from __future__ import annotations

import json
import time

import redis

from routing.classes import VramClass
from routing.jobs.keys import Keys


def heartbeat(
    client: redis.Redis, keys: Keys, name: str, vram_class: VramClass, ttl_s: float, **state: object
) -> None:
    """Say that worker ``name`` of ``vram_class`` is alive for the next ``ttl_s``; ``state`` (its
    resident models, GPU memory) rides along for the metrics.

    The heartbeat key expires on its own (Redis' clock decides who is alive); the ``workers``
    index names it, so readers cost the number of workers, not of keys. Names that have not
    beaten for ``_FORGET_AFTER_TTLS`` TTLs leave the index here, so it holds the fleet of the
    last few minutes, however many workers came and went."""
    now = time.time()
    value = json.dumps({"class": vram_class.value, "at": now, **state})
    with client.pipeline(transaction=False) as pipe:
        pipe.set(keys.worker(name), value, px=int(ttl_s * 1000))
        pipe.zadd(keys.workers, {name: now})
        pipe.zremrangebyscore(keys.workers, "-inf", now - _FORGET_AFTER_TTLS * ttl_s)
        pipe.execute()


# A worker stays in the index this many TTLs after its last beat (its key is gone long before).
_FORGET_AFTER_TTLS = 10


def live_workers(client: redis.Redis, keys: Keys) -> dict[str, VramClass]:
    """Live workers by name, with their class."""
    return {name: VramClass(beat["class"]) for name, beat in worker_states(client, keys).items()}


def worker_states(client: redis.Redis, keys: Keys) -> dict[str, dict]:
    """Live workers by name, with what their last heartbeat said: two commands, whatever the
    size of the keyspace."""
    names = [name.decode() for name in client.zrange(keys.workers, 0, -1)]
    values = client.mget([keys.worker(name) for name in names]) if names else []
    return {name: json.loads(value) for name, value in zip(names, values, strict=True) if value is not None}

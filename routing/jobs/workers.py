"""The worker registry: every worker process beats a heartbeat naming its class, with what it
holds (resident models, GPU memory); a worker whose heartbeat expired is gone. ETA, the metrics and
the reaper read it."""

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
    resident models, GPU memory) rides along for the metrics."""
    value = json.dumps({"class": vram_class.value, "at": time.time(), **state})
    client.set(keys.worker(name), value, px=int(ttl_s * 1000))


def live_workers(client: redis.Redis, keys: Keys) -> dict[str, VramClass]:
    """Live workers by name, with their class."""
    return {name: VramClass(beat["class"]) for name, beat in worker_states(client, keys).items()}


def worker_states(client: redis.Redis, keys: Keys) -> dict[str, dict]:
    """Live workers by name, with what their last heartbeat said."""
    prefix = keys.worker("")
    names = list(client.scan_iter(keys.worker("*"), count=1000))
    values = client.mget(names) if names else []
    return {
        name.decode().removeprefix(prefix): json.loads(value)
        for name, value in zip(names, values, strict=True)
        if value is not None
    }

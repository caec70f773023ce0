"""A live-events stream whose job store fails mid-stream ends with an ``error`` event; the set of
webhook URLs a 410 disabled is bounded and expires (fakeredis runs the same Lua)."""

from __future__ import annotations

import asyncio
import json

import fakeredis
import pytest
import redis

from producer.events import JobEvents
from routing.jobs import webhook_log
from routing.jobs.keys import Keys
from routing.jobs.record import JobStatus
from routing.jobs.store import JobStore, NewJob
from routing.settings import Settings


@pytest.mark.parametrize("error", [redis.ConnectionError("gone"), redis.ResponseError("READONLY replica")])
def test_a_redis_error_mid_stream_ends_it_with_an_error_event(error: redis.RedisError) -> None:
    server = fakeredis.FakeServer()
    keys = Keys("unit")
    store = JobStore(fakeredis.FakeRedis(server=server), keys, ttl_s=3600)
    store.create([NewJob("a", "z-image-turbo", "text-to-image", "{}", "gpu16", ("gpu16", "message-a"))])
    live = JobEvents(Settings(), keys, keepalive_s=0.05)
    live._redis = fakeredis.FakeAsyncRedis(server=server)
    reads = 0
    xread = live._redis.xread

    async def failing_xread(*args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        if reads > 1:
            raise error
        return await xread(*args, **kwargs)

    live._redis.xread = failing_xread  # type: ignore[method-assign]

    async def read_all() -> list[str]:
        return [chunk async for chunk in live.sse("a")]

    chunks = asyncio.run(read_all())
    assert chunks[0].startswith("id: ") and "event: queued" in chunks[0]
    assert chunks[-1].startswith("event: error\ndata: ")
    assert json.loads(chunks[-1].split("data: ", 1)[1])["job_id"] == "a"
    assert store.get("a").status is JobStatus.QUEUED


def test_the_urls_a_410_disabled_are_bounded_and_expire() -> None:
    client, keys = fakeredis.FakeRedis(), Keys("unit")
    for n in range(3):
        webhook_log.disable_url(client, keys, "t1", f"https://h/{n}", max_urls=3, ttl_s=600)
    assert webhook_log.disabled_urls(client, keys, "t1") == {f"https://h/{n}" for n in range(3)}
    # One more: the newest is kept, one of the others goes.
    webhook_log.disable_url(client, keys, "t1", "https://h/new", max_urls=3, ttl_s=600)
    disabled = webhook_log.disabled_urls(client, keys, "t1")
    assert len(disabled) == 3 and "https://h/new" in disabled
    assert 0 < client.ttl(keys.webhooks_disabled("t1")) <= 600
    assert webhook_log.enable_url(client, keys, "t1", "https://h/new")

"""Giving back the messages a dead worker held (``worker.held``), on the suite's Redis: messages
taken through Kombu itself with the workers' transport (so its unacknowledged set holds them, and
the holder's set records them, as they do in a worker) by two workers' main processes on another
host, one beating and one dead. The kill tests with real worker processes are
tests/faults/test_kill.py and tests/faults/test_taking.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kombu import Connection

from producer.client import Client
from routing.celery_config import UNACKED_INDEX_KEY, UNACKED_KEY, make_celery
from routing.classes import VramClass
from routing.jobs.messages import task_id
from routing.settings import Settings
from tests.faults.harness import small_request, wait_for
from worker import held
from worker.liveness import Reaper

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Main processes of another host: only their heartbeats say whether they are alive.
ALIVE = "gpu16@elsewhere:101:00000001"
DEAD = "gpu16@elsewhere:102:00000002"


@pytest.fixture
def broker(fleet_settings: Settings, client: Client, redis_client) -> Iterator[Callable[[str], Connection]]:
    """Kombu's connection of a holder's main process (the worker's transport, its options); the
    unacknowledged set starts empty (this database is this test's)."""
    redis_client.delete(UNACKED_KEY, UNACKED_INDEX_KEY)
    app = make_celery(fleet_settings, VramClass.GPU16)
    opened: list[Connection] = []

    def connect(holder: str) -> Connection:
        options = held.Holder(client.store.client, client.keys, holder, ttl_s=5).transport_options()
        opened.append(app.connection_for_read(transport=held.TRANSPORT, transport_options=options))
        return opened[-1]

    yield connect
    for connection in opened:
        connection.close()


def _take(client: Client, broker: Callable[[str], Connection], holder: str, count: int) -> dict[str, str]:
    """Submit ``count`` jobs and take their messages through Kombu, unacknowledged, as ``holder``'s
    main process does: delivery tag -> job id."""
    for i in range(count):
        client.submit(small_request(f"held {holder} {i}"))
    queue = broker(holder).SimpleQueue("gpu16")
    taken = {}
    for _ in range(count):
        message = queue.get(timeout=5)
        taken[message.delivery_tag] = message.headers["id"]
    return taken


def test_a_message_is_recorded_as_held_as_kombu_holds_it(client: Client, broker):
    """Catches a transport that does not record what it takes (the reaper would know nothing to
    give back), or records it under another holder. The one transaction is what the kill tests
    prove (tests/faults/test_taking.py)."""
    redis = client.store.client
    client.submit(small_request("taken"))
    queue = broker(ALIVE).SimpleQueue("gpu16")
    message = queue.get(timeout=5)
    tag = message.delivery_tag
    assert {t.decode() for t in redis.hkeys(UNACKED_KEY)} == {tag}
    assert {t.decode() for t in redis.smembers(client.keys.held(ALIVE))} == {tag}
    assert held.holders(redis, client.keys) == [ALIVE]
    # Kombu's own restore reads what this transport wrote as it reads its own writes.
    message.requeue()
    assert [task_id(m) for m in redis.lrange("gpu16", 0, -1)] == [message.headers["id"]]
    assert redis.hlen(UNACKED_KEY) == 0 and redis.zcard(UNACKED_INDEX_KEY) == 0


def test_producers_and_webhook_workers_keep_kombus_transport(fleet_settings: Settings):
    """Only a GPU worker's main process records what it takes: the API's app, and the webhooks
    worker's, never name the worker's transport."""
    assert make_celery(fleet_settings).conf.broker_transport is None
    assert make_celery(fleet_settings, VramClass.GPU16).conf.broker_transport is None


def test_a_worker_on_a_tls_url_keeps_kombus_tls_options():
    """Naming the transport takes the place of the URL's scheme: catches a worker that would open a
    plain connection to a rediss:// server, where Kombu's own transport opens a TLS one."""
    code = (
        "import worker.celery_app as c; k = c.app.connection_for_read(); print(k.transport_cls, bool(k.ssl))"
    )
    env = {**os.environ, "FLEET_REDIS_URL": "rediss://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == [held.TRANSPORT, "True"]


def test_the_reaper_gives_back_only_the_dead_workers_messages(client: Client, broker):
    """Catches a reaper that gives back the messages of a worker that is alive (a second copy of
    a job it may be about to claim), or that leaves a dead worker's in Kombu's set."""
    redis = client.store.client
    alive = _take(client, broker, ALIVE, 1)
    dead = _take(client, broker, DEAD, 2)
    assert redis.llen("gpu16") == 0 and redis.hlen(UNACKED_KEY) == 3
    reaper = Reaper(client.store, ttl_s=0.2)

    def reaped() -> bool:
        held.beat(redis, client.keys, ALIVE, ttl_s=5)
        reaper.reap()
        return DEAD not in held.holders(redis, client.keys)

    # Another host's worker is dead once it has not beaten for a whole TTL.
    wait_for(reaped, 10, "the dead worker reaped")

    back = [task_id(m) for m in redis.lrange("gpu16", 0, -1)]
    assert sorted(back) == sorted(dead.values())
    assert {t.decode() for t in redis.hkeys(UNACKED_KEY)} == set(alive)
    assert {t.decode() for t in redis.zrange(UNACKED_INDEX_KEY, 0, -1)} == set(alive)
    assert all(json.loads(m)["headers"]["redelivered"] for m in redis.lrange("gpu16", 0, -1))
    assert held.holders(redis, client.keys) == [ALIVE]
    assert {t.decode() for t in redis.smembers(client.keys.held(ALIVE))} == set(alive)
    reaper.reap()  # and again: nothing more
    assert redis.llen("gpu16") == 2


def test_reapers_racing_give_each_message_back_once(client: Client, broker):
    """Catches a give-back that is not one watched transaction: reapers that all read the dead
    worker's set before any of them deletes it push a copy each."""
    redis = client.store.client
    dead = _take(client, broker, DEAD, 3)
    start = threading.Barrier(8)
    given: list[list[str]] = []

    def reap() -> None:
        start.wait()
        given.append(held.give_back(redis, client.keys, DEAD))

    threads = [threading.Thread(target=reap) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sorted(tag for tags in given for tag in tags) == sorted(dead)
    assert sorted(task_id(m) for m in redis.lrange("gpu16", 0, -1)) == sorted(dead.values())
    assert redis.hlen(UNACKED_KEY) == 0 and redis.zcard(UNACKED_INDEX_KEY) == 0


def test_a_holder_forgets_what_it_acknowledged(client: Client, broker):
    """Its set keeps only what Kombu still holds for it, so it does not grow with every job."""
    redis = client.store.client
    queue = broker(ALIVE).SimpleQueue("gpu16")
    client.submit(small_request("acknowledged"))
    client.submit(small_request("still held"))
    first, second = queue.get(timeout=5), queue.get(timeout=5)
    first.ack()
    held.beat(redis, client.keys, ALIVE, ttl_s=5)
    assert {t.decode() for t in redis.smembers(client.keys.held(ALIVE))} == {second.delivery_tag}

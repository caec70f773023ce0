"""Putting back a message lost between its queue and Kombu's unacknowledged set (``worker.lost``),
on the suite's Redis: messages taken through Kombu with the workers' transport, restored by Kombu
itself, and taken off the queue the way BRPOP takes them, by a taker that never writes them
anywhere. The kill test with real worker processes is tests/faults/test_taking.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from kombu import Connection

from producer.client import Client
from routing.celery_config import UNACKED_INDEX_KEY, UNACKED_KEY, make_celery
from routing.classes import VramClass
from routing.jobs.messages import task_id
from routing.settings import Settings
from tests.faults.harness import small_request
from worker import held
from worker.lost import HEAD, LostSweep

pytestmark = pytest.mark.integration

HOLDER = "gpu16@elsewhere:101:00000001"


@pytest.fixture
def broker(fleet_settings: Settings, client: Client, redis_client) -> Iterator[Connection]:
    """A worker main process's Kombu connection; the unacknowledged set starts empty."""
    redis_client.delete(UNACKED_KEY, UNACKED_INDEX_KEY)
    options = held.Holder(client.store.client, client.keys, HOLDER, ttl_s=5).transport_options()
    app = make_celery(fleet_settings, VramClass.GPU16)
    with app.connection_for_read(transport=held.TRANSPORT, transport_options=options) as connection:
        yield connection


def _sweep(client: Client) -> LostSweep:
    return LostSweep(client.store, ["gpu16"], interval_s=1.0)


def _queued(client: Client) -> list[str]:
    return [task_id(m) for m in client.store.client.lrange("gpu16", 0, -1)]


def test_a_message_anywhere_is_not_lost(client: Client, broker: Connection):
    """Catches a sweep that takes a job for lost while its message is on its queue, held in
    Kombu's unacknowledged set, or back on its queue restored by Kombu (other bytes: marked
    redelivered): a second copy each sweep."""
    redis = client.store.client
    restored = client.submit(small_request("restored"))
    taken = client.submit(small_request("taken"))
    waiting = client.submit(small_request("waiting"))
    queue = broker.SimpleQueue("gpu16")
    first, second = queue.get(timeout=5), queue.get(timeout=5)
    assert (first.headers["id"], second.headers["id"]) == (restored.id, taken.id)
    # Kombu's visibility-timeout restore, to the end workers take from.
    first.channel.qos.restore_by_tag(first.delivery_tag)
    assert json.loads(redis.lindex("gpu16", -1))["headers"]["redelivered"] is True
    sweep = _sweep(client)

    assert sweep.sweep() == [] and sweep.sweep() == []
    assert _queued(client) == [waiting.id, restored.id]
    assert {t.decode() for t in redis.hkeys(UNACKED_KEY)} == {second.delivery_tag}


def test_a_message_taken_off_its_queue_and_never_held_is_put_back_once(client: Client):
    """Catches a sweep that never puts back a message lost off its queue (the job would wait
    until it expires), one that puts it back at the first look (a live worker between its BRPOP
    and its write would get a second copy each time), and sweepers racing that put it back twice."""
    redis = client.store.client
    job = client.submit(small_request("lost"))
    behind = client.submit(small_request("behind it"))
    assert task_id(redis.rpop("gpu16")) == job.id  # a BRPOP whose taker died before any write
    sweeps = [_sweep(client) for _ in range(8)]

    assert all(sweep.sweep() == [] for sweep in sweeps)  # suspect, not yet put back
    assert _queued(client) == [behind.id]
    start = threading.Barrier(len(sweeps))
    put_back: list[list[str]] = []

    def second_look(sweep: LostSweep) -> None:
        start.wait()
        put_back.append(sweep.sweep())

    threads = [threading.Thread(target=second_look, args=(sweep,)) for sweep in sweeps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sorted(put_back) == [[]] * (len(sweeps) - 1) + [[job.id]]
    # At the end workers take from (it waited longest), with a delivery tag of its own, and named
    # by the record as its message (a cancel takes that one off the queue).
    assert _queued(client) == [behind.id, job.id]
    message = redis.lindex("gpu16", -1)
    assert redis.hget(client.keys.job(job.id), "queued_message") == message
    assert (
        json.loads(message)["properties"]["delivery_tag"]
        != json.loads(redis.lindex("gpu16", 0))["properties"]["delivery_tag"]
    )
    assert all(sweep.sweep() == [] for sweep in sweeps)
    assert len(_queued(client)) == 2


def test_a_suspect_whose_taker_writes_it_late_is_left_alone(client: Client, broker: Connection):
    """A live taker between its BRPOP and its write when the first look comes: held by the second
    look, so no copy is made. Catches a sweep that puts back on one look, or that does not look
    again before it puts back."""
    redis = client.store.client
    job = client.submit(small_request("taken slowly"))
    raw = redis.rpop("gpu16")
    sweep = _sweep(client)
    assert sweep.sweep() == []
    redis.lpush("gpu16", raw)  # the taker's write, late: as good as held
    broker.SimpleQueue("gpu16").get(timeout=5)

    assert sweep.sweep() == []
    assert redis.llen("gpu16") == 0 and redis.hlen(UNACKED_KEY) == 1
    assert client.get(job.id).status.value == "queued"


def test_only_the_head_of_each_line_is_looked_at(client: Client):
    """A sweep's cost is bounded by ``HEAD`` jobs a queue, not by the queue's length: a message
    lost behind ``HEAD`` queued jobs waits until the jobs before it are claimed."""
    redis = client.store.client
    ahead = [client.submit(small_request(f"ahead {i}")) for i in range(HEAD)]
    lost = client.submit(small_request("lost behind them"))
    redis.lrem("gpu16", 1, redis.hget(client.keys.job(lost.id), "queued_message"))
    sweep = _sweep(client)

    assert sweep.sweep() == [] and sweep.sweep() == []
    # The first job gone (canceled, as if claimed): the lost one is at the head now.
    client.cancel(ahead[0].id)
    assert sweep.sweep() == [] and sweep.sweep() == [lost.id]

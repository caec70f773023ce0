"""The broker messages a worker holds, and giving back at once those of a worker that died.

A GPU worker's main process takes a job's message from its queue as soon as it can, and hands it
to its pool child; Kombu keeps the message in its unacknowledged set (``UNACKED_KEY``: delivery tag
-> [message, exchange, routing key]; ``UNACKED_INDEX_KEY``: delivery tag -> when taken) until the
job's run acknowledges it, and puts it back on its queue only once the visibility timeout has
passed. A worker killed after it took a message but before its pool child claimed the job (the
child was still starting: importing torch, loading models) leaves a job whose record says
``queued`` and whose only message is in that set: the job reaper, which looks at running jobs,
never sees it, and it would wait out the visibility timeout.

So each main process writes the delivery tag of every message it takes into a set of its own,
``Keys.held``, in the very transaction in which Kombu writes the message into its unacknowledged
set (``QoS.append``, through the worker's broker transport, ``Transport``): there is no instant at
which a message is unacknowledged and not recorded. It beats a heartbeat of its own (``beat``; it
also forgets the tags acknowledged since). The reaper (``worker.liveness.Reaper``), which runs in
every worker, gives back every message still unacknowledged in the set of a main process that is
dead (``give_back``): pushed back on its queue, where the next free worker takes it first, and
taken out of Kombu's set in the same transaction, so the visibility timeout's own restore cannot
make a second copy, and the set is deleted with it, so reapers racing each other give the
messages back once.

A message whose job was claimed (the dead worker was running it) comes back too, as the visibility
timeout would bring it: the job reaper hands the job back as well, and whichever copy comes second
finds the job taken or finished and is dropped (``JobRunner._claim``).

The instant before Kombu's write, when the message is already off its queue, is
``worker.lost``'s.

The same transport leaves a master that stops answering (cut off from the network, its
connections never closed): an acknowledgement it does not answer within Kombu's socket timeout is
given up, and the channel's connections are dropped with its blocking pop's, so each asks the
Sentinels again (``QoS``, ``Channel``). The webhook workers run it too, with no holder.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kombu.transport
import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from routing.celery_config import UNACKED_INDEX_KEY, UNACKED_KEY
from routing.jobs.keys import Keys
from routing.settings import Settings

log = logging.getLogger(__name__)

# The broker transport of a worker's main process (Celery's ``broker_transport``): Kombu's Redis
# transport, whose unacknowledged writes also record the holder's.
TRANSPORT = f"{__name__}:Transport"
# The same on Kombu's Sentinel transport (``FLEET_REDIS_SENTINELS``).
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"

# Forgets the tags of a holder's set that Kombu's set no longer has (acknowledged, or restored).
_FORGET_ACKNOWLEDGED = """
local unacked, held = KEYS[1], KEYS[2]
for _, tag in ipairs(redis.call('SMEMBERS', held)) do
  if redis.call('HEXISTS', unacked, tag) == 0 then redis.call('SREM', held, tag) end
end
"""


def beat(client: redis.Redis, keys: Keys, holder: str, ttl_s: float) -> None:
    """Say that ``holder`` is alive for the next ``ttl_s``, and forget the messages it no longer
    holds. A holder leaves the index only when a reaper gives back what it held: an index trimmed
    by age would forget a dead holder nobody reaped while no worker was running."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(keys.holder(holder), "1", px=int(ttl_s * 1000))
        pipe.zadd(keys.holders, {holder: time.time()})
        pipe.eval(_FORGET_ACKNOWLEDGED, 2, UNACKED_KEY, keys.held(holder))
        pipe.execute()


def holders(client: redis.Redis, keys: Keys) -> list[str]:
    """Every main process that took messages and has not been reaped, alive or not."""
    return [name.decode() for name in client.zrange(keys.holders, 0, -1)]


def give_back(client: redis.Redis, keys: Keys, holder: str) -> list[str]:
    """Put every message dead ``holder`` took and nobody acknowledged back on its queue, take it
    out of Kombu's unacknowledged set, and forget ``holder``: one transaction, watched on both
    sets, so Kombu's own restore or another reaper that gets there first leaves nothing to do
    here, and one that comes second finds nothing. Returns the delivery tags given back."""
    held = keys.held(holder)

    def transaction(pipe: redis.client.Pipeline) -> list[str]:
        tags = sorted(pipe.smembers(held))
        raws = pipe.hmget(UNACKED_KEY, tags) if tags else []
        pipe.multi()
        given: list[str] = []
        for tag, raw in zip(tags, raws, strict=True):
            if raw is None:
                continue  # acknowledged, or restored by Kombu already
            payload, exchange, routing_key = json.loads(raw)
            if exchange:
                # Never ours: the fleet's messages go through the anonymous exchange, whose
                # routing key is the queue. Left for the visibility timeout to restore.
                log.warning("message %s of %s is for exchange %r; left to Kombu", tag, holder, exchange)
                continue
            # Marked as Kombu marks what it restores.
            payload.setdefault("headers", {})["redelivered"] = True
            payload.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
            # The end the workers take from: the job that waited longest goes first.
            pipe.rpush(routing_key, json.dumps(payload))
            pipe.hdel(UNACKED_KEY, tag)
            pipe.zrem(UNACKED_INDEX_KEY, tag)
            given.append(tag.decode())
        pipe.delete(held, keys.holder(holder))
        pipe.zrem(keys.holders, holder)
        return given

    given = client.transaction(transaction, held, UNACKED_KEY, value_from_callable=True)
    if given:
        log.warning("gave back the messages dead worker %s held: %s", holder, ", ".join(given))
    return given


class QoS(kombu_redis.QoS):
    """Kombu's acknowledgement emulation for Redis, whose write of a message taken into the
    unacknowledged set (Kombu's ``QoS.append``, the same two commands) also adds its delivery tag
    to the holder's set and the holder to the index of holders, in one MULTI/EXEC: a process
    killed before EXEC leaves neither write, one killed after leaves both. A channel with no
    holder (``Channel.holder``) writes what Kombu writes."""

    def append(self, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        if not channel.holder:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        now = time.time()
        with channel.conn_or_acquire() as client, client.pipeline(transaction=True) as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: now})
            pipe.hset(
                self.unacked_key,
                delivery_tag,
                dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
            )
            pipe.sadd(channel.held_key, delivery_tag)
            pipe.zadd(channel.holders_key, {channel.holder: now})
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)  # Kombu's in-process record of it

    def ack(self, delivery_tag: str) -> None:
        with self._given_up_if_unanswered(delivery_tag):
            super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        with self._given_up_if_unanswered(delivery_tag):
            super().reject(delivery_tag, requeue)

    @contextmanager
    def _given_up_if_unanswered(self, delivery_tag: str) -> Iterator[None]:
        """An acknowledgement the broker did not answer (a master cut off from the network,
        past Kombu's socket timeout) leaves the message in the unacknowledged set, whence the
        visibility timeout or the reaper gives it back and the job's fence drops the copy. Kombu
        would keep counting it as held, and with one message a worker (prefetch 1) would never
        take another; so it is given up here, and the channel's connections are dropped, so its
        next command asks the Sentinels for the master. The error still reaches Celery, which
        logs it."""
        try:
            yield
        except self.channel.connection_errors:
            virtual.QoS.ack(self, delivery_tag)
            self.channel.drop_connections()
            raise


class Channel(kombu_redis.Channel):
    QoS = QoS
    # Set from the transport options (``Holder.transport_options``); None: Kombu's own writes.
    holder: str | None = None
    held_key: str | None = None
    holders_key: str | None = None
    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "holder",
        "held_key",
        "holders_key",
    )

    def _on_connection_disconnect(self, connection: Any) -> None:
        """The blocking pop's connection dropped (Kombu's health check: its master stopped
        answering) drops the pool's other connections too. They lead to the same master, and the
        pop's next connection asks the Sentinels: a message it takes from the new master would
        otherwise have its unacknowledged record written through one of them, fail, and be lost
        between the two."""
        polling = connection is not None and connection is self._in_poll
        super()._on_connection_disconnect(connection)
        if polling:
            self.drop_connections()

    def drop_connections(self) -> None:
        """Close every connection of the channel, its commands' pool and its pop's: the next
        command on each opens one to the master the Sentinels name then."""
        self.pool.disconnect()
        if self._async_pool is not None:
            self._async_pool.disconnect()


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(kombu_redis.SentinelChannel, Channel):
    """``Channel`` on the master the Sentinels name."""

    from_transport_options = (
        *kombu_redis.SentinelChannel.from_transport_options,
        "holder",
        "held_key",
        "holders_key",
    )


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def use_transport(app: Any, settings: Settings) -> None:
    """Give the Celery ``app`` of this process the fleet's broker transport: Kombu's Redis
    transport (its Sentinel one with FLEET_REDIS_SENTINELS) with this module's ``QoS``. Through
    Sentinel the broker URL is one sentinel:// URL per Sentinel, and Kombu takes the transport
    from each URL's scheme again as it moves to the next one after a lost connection: so in this
    process the scheme itself names the fleet's transport. Named, a transport takes the place of
    the URL's scheme, and of the TLS options Kombu gives a rediss:// URL with it:
    routing.celery_config says them again (broker_use_ssl)."""
    if settings.redis_sentinels:
        kombu.transport.TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT
    else:
        app.conf.broker_transport = TRANSPORT


class Holder:
    """This worker's main process as a holder of messages: the broker options under which what it
    takes is recorded (``QoS``), and its beat, from a thread (the main process runs no job, so
    nothing else would say it is alive)."""

    def __init__(self, client: redis.Redis, keys: Keys, name: str, ttl_s: float):
        self.client = client
        self.keys = keys
        self.name = name
        self.ttl_s = ttl_s

    def transport_options(self) -> dict[str, str]:
        """Celery's ``broker_transport_options`` that make ``Transport`` record what this
        process takes."""
        return {"holder": self.name, "held_key": self.keys.held(self.name), "holders_key": self.keys.holders}

    def start(self) -> threading.Thread:
        def loop() -> None:
            while True:
                try:
                    beat(self.client, self.keys, self.name, self.ttl_s)
                except redis.RedisError:
                    log.warning("holder heartbeat failed; retrying")
                time.sleep(self.ttl_s / 3)

        thread = threading.Thread(target=loop, name="holder-heartbeat", daemon=True)
        thread.start()
        return thread

"""The Redis connections every process uses, built from settings: to one Redis, or to the master
a set of Redis Sentinels name.

A worker must ride out a Redis restart: a step's progress write or a job's final state change
that meets a closed connection is retried with backoff for about a minute before the job fails,
so a restart (with AOF on, nothing is lost) costs a pause, not the job.

With ``FLEET_REDIS_SENTINELS`` every connection is made to the address the Sentinels give for
the master (redis-py's ``redis.sentinel``): when they promote a replica, a command that meets
the dead master's closed socket, or the old master's READONLY answer once it is back as a
replica, is retried by the same backoff, on a connection to the new master; a client leaves a
master the Sentinels replaced while it was still up the moment they announce it
(``_MasterWatch``), and so does the API's asyncio client of event streams (``follow=True``).
Celery's broker (Kombu's ``sentinel://`` transport) and Flower follow the same Sentinels
(``broker_url``). A ``rediss://`` ``FLEET_REDIS_URL`` puts the Sentinels and the data nodes on
TLS, with its options.

A failover loses what the master had not yet sent to the replica it promoted. So a write the
fleet answers for is followed, on the same connection, by Redis ``WAIT`` for
``FLEET_REDIS_MIN_REPLICAS`` replicas (``Replication``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from routing.settings import Settings

log = logging.getLogger(__name__)

# Sentinels answer at once or not at all: a dead one is skipped after this.
_SENTINEL_TIMEOUT_S = 2.0
# Kombu's broker connections (a worker's blocking pop, its acks): a command's answer waited for at
# most this long, and a pop whose answer is overdue dropped within about twice the check's
# interval (Kombu's health check). Kombu's default waits forever: a master cut off from the
# network, answering nothing and closing nothing, held a worker's ack, and with it the worker,
# for good. Its longest command (restoring unacknowledged messages) takes milliseconds.
BROKER_SOCKET_TIMEOUT_S = 5.0
BROKER_HEALTH_CHECK_S = 10


class _SentinelConnection(redis.sentinel.SentinelManagedConnection):
    """redis-py's connection to the master the Sentinels name, whose every reconnect asks them.

    redis-py's own asks them only in ``connect()``: a command sent on a connection the dead master
    closed (a pipeline's, kept across its retries) reconnects in ``send_packed_command`` through
    ``connect_check_health``, to the address it had, and keeps retrying the dead master until the
    retries run out (a minute and more) while the Sentinels name a new one. Here every reconnect
    goes through ``connect()``."""

    def connect_to(self, address: tuple[str, int]) -> None:
        self.host, self.port = address
        super().connect_check_health(
            check_health=self.connection_pool.check_connection, retry_socket_connect=False
        )

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self._sock:
            self.connect()


class _SentinelSSLConnection(_SentinelConnection, redis.connection.SSLConnection):
    """``_SentinelConnection`` over TLS (a ``rediss://`` FLEET_REDIS_URL)."""


class _AsyncSentinelConnection(aiosentinel.SentinelManagedConnection):
    """``_SentinelConnection`` for asyncio."""

    async def connect_to(self, address: tuple[str, int]) -> None:
        self.host, self.port = address
        await super().connect_check_health(
            check_health=self.connection_pool.check_connection, retry_socket_connect=False
        )

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected:
            await self.connect()


class _AsyncSentinelSSLConnection(_AsyncSentinelConnection, aioredis.SSLConnection):
    """``_AsyncSentinelConnection`` over TLS."""


def connect(settings: Settings) -> redis.Redis:
    """A client of the fleet's Redis (its master, through Sentinel) that retries a command across
    a restart or a failover."""
    options: dict[str, Any] = {
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=settings.redis_retries),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 30,
        "socket_connect_timeout": 5,
    }
    if not settings.redis_sentinels:
        return redis.Redis.from_url(settings.redis_url, **options)
    sentinel = redis.sentinel.Sentinel(
        sentinel_addresses(settings), sentinel_kwargs=_sentinel_options(settings), **_data_node(settings)
    )
    client = sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=_FollowingRedis,
        connection_class=_SentinelConnection if tls_options(settings) is None else _SentinelSSLConnection,
        **options,
    )
    client.watch = _MasterWatch(
        client.connection_pool, sentinel_addresses(settings), _sentinel_options(settings), settings
    )
    client.watch.start()
    return client


class _MasterWatch:
    """Moves a Sentinel-managed pool to the new master the moment the Sentinels announce it
    (``+switch-master`` on their pub/sub), as Jedis's pool does; redis-py asks them only when a
    connection is made.

    A master the Sentinels replaced while it was still up (split off by the network, or paused
    past ``down-after-milliseconds`` and failed over on a false alarm) goes on answering the
    connections it had, writes included, until they turn it into a replica: ten seconds and more.
    A worker's move made there is lost with it, and a job then runs twice. Here idle connections
    are dropped and busy ones are not given back (redis-py's pool, once its master address
    changes): the next command goes to the new master.

    One thread per pool, subscribed to one Sentinel at a time (the next when it goes), asking
    them all afresh every ``RECHECK_S`` too, in case an announcement was missed; it ends with
    the client's ``close()`` or the pool, and is started again in a forked child.

    An asyncio pool (``loop`` given) is moved in its own event loop, busy connections included
    (``_BlockingSentinelPool.follow_master``); its watch ends with the loop, and is not started
    again in a forked child, where that loop does not run."""

    RECHECK_S = 5.0
    _live: weakref.WeakSet[_MasterWatch] = weakref.WeakSet()

    def __init__(
        self,
        pool: redis.sentinel.SentinelConnectionPool,
        sentinels: list[tuple[str, int]],
        options: dict[str, Any],
        settings: Settings,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self._pool: weakref.ref[Any] = weakref.ref(pool)
        self._sentinels = sentinels
        self._options = options
        self._master = settings.redis_sentinel_master
        self._loop = loop
        self._stop = threading.Event()

    def start(self) -> None:
        self._live.add(self)
        threading.Thread(target=self._run, name=f"sentinel-watch:{self._master}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._live.discard(self)

    @classmethod
    def _restart_all(cls) -> None:
        """In a forked child: the parent's threads are not there, and a lock one of them held
        as the process forked would stay held, so each watch gets a new stop event."""
        for watch in list(cls._live):
            # An asyncio pool's loop does not run in the child.
            following = not watch._stop.is_set() and watch._loop is None
            watch._stop = threading.Event()
            if following:
                watch.start()
            else:
                watch.stop()

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            host, port = self._sentinels[index % len(self._sentinels)]
            index += 1
            try:
                with redis.Redis(host=host, port=port, **self._options) as sentinel:
                    with sentinel.pubsub(ignore_subscribe_messages=True) as pubsub:
                        pubsub.subscribe("+switch-master")
                        self._listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                log.debug("Sentinel %s:%d: %s; watching through the next", host, port, exc)
                self._stop.wait(0.5)

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        """Until stopped or the Sentinel goes: follow each switch of the master, and recheck."""
        self._follow()  # a switch while no Sentinel was listened to
        recheck_at = time.monotonic() + self.RECHECK_S
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=1.0)
            if message is not None:
                # "<name> <old ip> <old port> <new ip> <new port>"
                parts = _decoded(message["data"]).split(" ")
                if len(parts) == 5 and parts[0] == self._master and parts[4].isdigit():
                    log.warning("the Sentinels named a new master: %s:%s", parts[3], parts[4])
                    self._follow((parts[3], int(parts[4])))
            elif time.monotonic() >= recheck_at:
                self._follow()
            else:
                continue
            recheck_at = time.monotonic() + self.RECHECK_S

    def _follow(self, announced: tuple[str, int] | None = None) -> None:
        """Ask the Sentinels for the master: a new address drops the pool's connections to the
        old one. After an announcement, until they name the ``announced`` master (it reaches the
        other Sentinels within seconds) or ``RECHECK_S`` has passed."""
        deadline = time.monotonic() + self.RECHECK_S
        while not self._stop.is_set():
            pool = self._pool()
            if pool is None:
                self._stop.set()
                return
            try:
                named = self._ask(pool)
            except (redis.RedisError, concurrent.futures.TimeoutError) as exc:
                log.debug("no master named: %s", exc)  # none names one now: the next command retries
                named = None
            del pool
            if announced is None or named == announced or time.monotonic() > deadline:
                return
            self._stop.wait(0.1)

    def _ask(self, pool: Any) -> tuple[str, int] | None:
        """The master the Sentinels name, the pool moved to it."""
        if self._loop is None:
            return pool.get_master_address()
        try:
            moved = asyncio.run_coroutine_threadsafe(pool.follow_master(), self._loop)
        except RuntimeError:  # the loop is closed: its clients with it
            self._stop.set()
            return None
        try:  # each Sentinel is asked within its timeout: past them all, the loop is stuck or gone
            return moved.result(timeout=_SENTINEL_TIMEOUT_S * len(self._sentinels) + 5)
        except concurrent.futures.CancelledError:  # the loop is shutting down
            self._stop.set()
            return None


class _FollowingRedis(redis.Redis):
    """The client of the master the Sentinels name, its pool moved by a ``_MasterWatch``."""

    watch: _MasterWatch | None = None

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        super().close()


def _decoded(data: bytes | str) -> str:
    return data.decode() if isinstance(data, bytes) else data


os.register_at_fork(after_in_child=_MasterWatch._restart_all)


class _BlockingSentinelPool(aiosentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Connections to the master the Sentinels name, at most ``max_connections`` of them: a
    caller past that waits for one (up to ``timeout``), as with ``BlockingConnectionPool``."""

    async def follow_master(self) -> tuple[str, int]:
        """The master the Sentinels name now, and every connection to another one closed: idle
        ones (redis-py's pool, on a new address), and busy ones, whose command then fails and is
        retried by the client on the new master: a read blocked on the old master (an event
        stream's ``XREAD``) is sent again to the new one. So this pool's clients only read: a write
        cut off this way could be made twice."""
        named = await self.get_master_address()
        busy = [
            connection
            for connection in self._in_use_connections
            if connection.is_connected and (connection.host, connection.port) != named
        ]
        await asyncio.gather(*(connection.disconnect() for connection in busy), return_exceptions=True)
        return named


class _FollowingAsyncRedis(aioredis.Redis):
    """``_FollowingRedis`` for asyncio."""

    watch: _MasterWatch | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self.watch is not None:
            self.watch.stop()
        await super().aclose(close_connection_pool)


def connect_async(
    settings: Settings,
    *,
    max_connections: int,
    timeout_s: float,
    socket_timeout_s: float,
    follow: bool = False,
) -> aioredis.Redis:
    """An asyncio client of the fleet's Redis (its master, through Sentinel), with a bounded
    pool: a caller past ``max_connections`` waits for a free one up to ``timeout_s``.

    ``follow``: a long-lived client, made in the event loop it serves, of reads only, whose pool
    a ``_MasterWatch`` moves to a new master the moment the Sentinels announce it (a client made
    per request needs none: its next request asks them)."""
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": timeout_s,
        "socket_connect_timeout": 5,
        "socket_timeout": socket_timeout_s,
        # A read cut off (by a failover, or the pool moved to a new master) is sent again on a
        # new connection, briefly: a store still away ends a caller's event stream with an error
        # event to resume from, rather than holding it silent.
        "retry": redis.asyncio.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    if not settings.redis_sentinels:
        return aioredis.Redis.from_pool(
            aioredis.BlockingConnectionPool.from_url(settings.redis_url, **options)
        )
    sentinel = aiosentinel.Sentinel(
        sentinel_addresses(settings), sentinel_kwargs=_sentinel_options(settings), **_data_node(settings)
    )
    client = sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=_FollowingAsyncRedis,
        connection_pool_class=_BlockingSentinelPool,
        connection_class=_AsyncSentinelConnection
        if tls_options(settings) is None
        else _AsyncSentinelSSLConnection,
        **options,
    )
    if follow:
        client.watch = _MasterWatch(
            client.connection_pool,
            sentinel_addresses(settings),
            _sentinel_options(settings),
            settings,
            loop=asyncio.get_running_loop(),
        )
        client.watch.start()
    return client


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    addresses = []
    for address in settings.redis_sentinels:
        host, _, port = address.rpartition(":")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    """How to reach the Sentinels: over TLS, with the data nodes' options, when ``redis_url`` is
    a ``rediss://`` URL."""
    password = settings.redis_sentinel_password
    options: dict[str, Any] = {
        "socket_connect_timeout": _SENTINEL_TIMEOUT_S,
        "socket_timeout": _SENTINEL_TIMEOUT_S,
    }
    if password is not None:
        options["password"] = password.get_secret_value()
    if (tls := tls_options(settings)) is not None:
        options |= {"ssl": True, **tls}
    return options


def _data_node(settings: Settings) -> dict[str, Any]:
    """The database, user and password of the data nodes, and their TLS options, from
    ``redis_url``."""
    parsed = redis.connection.parse_url(settings.redis_url)
    node = {key: parsed[key] for key in ("db", "username", "password") if parsed.get(key) is not None}
    return node | (tls_options(settings) or {})


def tls_options(settings: Settings) -> dict[str, Any] | None:
    """The ``ssl_*`` options of a ``rediss://`` ``redis_url`` (its query: ``ssl_cert_reqs``,
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``); None for ``redis://``. The server's
    certificate is checked unless the URL says ``ssl_cert_reqs=none``: redis-py's default, which
    Kombu's (no check) is brought in line with (``broker_tls``)."""
    if not settings.redis_url.startswith("rediss://"):
        return None
    parsed = redis.connection.parse_url(settings.redis_url)
    return {"ssl_cert_reqs": "required"} | {
        key: value for key, value in parsed.items() if key.startswith("ssl_")
    }


def broker_tls(settings: Settings) -> dict[str, Any] | bool:
    """Celery's ``broker_use_ssl``: ``tls_options`` in Kombu's form, False without TLS."""
    options = tls_options(settings)
    if options is None:
        return False
    reqs = options["ssl_cert_reqs"]
    if isinstance(reqs, str):
        reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(reqs.lower(), ssl.CERT_REQUIRED)
    return options | {"ssl_cert_reqs": reqs}


def broker_url(settings: Settings) -> str:
    """Celery's broker URL: ``redis_url``, or with Sentinels one ``sentinel://`` URL per Sentinel
    (Kombu's form), each with the data nodes' password and database."""
    if not settings.redis_sentinels:
        return settings.redis_url
    node = _data_node(settings)
    credentials = ""
    if "password" in node:
        credentials = f"{quote(node.get('username', ''), safe='')}:{quote(node['password'], safe='')}@"
    database = node.get("db", 0)
    return ";".join(
        f"sentinel://{credentials}{host if ':' not in host else f'[{host}]'}:{port}/{database}"
        for host, port in sentinel_addresses(settings)
    )


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Kombu's transport options: its connections' timeouts, and the Sentinels where there are
    some (Kombu then asks them for the master at each reconnect)."""
    timeouts = {
        "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": 5,
        "health_check_interval": BROKER_HEALTH_CHECK_S,
    }
    if not settings.redis_sentinels:
        return timeouts
    sentinels = {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": _sentinel_options(settings),
    }
    return timeouts | sentinels


@dataclass(frozen=True)
class Replication:
    """How many replicas must hold a write before the fleet answers for it, and how long to wait
    for them (``FLEET_REDIS_MIN_REPLICAS``, ``FLEET_REDIS_REPLICA_TIMEOUT_MS``).

    Redis ``WAIT`` counts the replicas that acknowledged the writes of its own connection, so it
    goes in the same pipeline as the writes (``execute``). Replicas acknowledge one stream in
    order: a ``WAIT`` answered after a later write covers the earlier ones, whichever connection
    made them. So an answer for writes made elsewhere (a job found by its idempotency key) writes
    a fence key first (``fence``): without it a connection that wrote nothing is answered at once,
    even by a master the Sentinels have replaced and whose replicas have left it.
    """

    replicas: int = 0
    timeout_ms: int = 1000

    @classmethod
    def of(cls, settings: Settings) -> Replication:
        return cls(settings.redis_min_replicas, settings.redis_replica_timeout_ms)

    def execute(
        self, pipe: redis.client.Pipeline, *, raise_on_error: bool = True, fence: str | None = None
    ) -> tuple[list[Any], int | None]:
        """Run ``pipe``'s commands, then wait for the replicas on its connection (after writing
        ``fence``, when given). Returns the commands' replies and how many replicas hold them
        (None when none are asked for)."""
        if not self.replicas:
            return pipe.execute(raise_on_error=raise_on_error), None
        if fence:
            pipe.set(fence, repr(time.time()))
        pipe.wait(self.replicas, self.timeout_ms)
        *replies, held = pipe.execute(raise_on_error=raise_on_error)
        if isinstance(held, Exception):  # WAIT refused (asked of a replica): the writes' answer is unknown
            raise held
        if fence:
            fenced = replies.pop()
            if isinstance(fenced, Exception):  # READONLY: a replica now, and the WAIT answered nothing
                raise fenced
        return replies, held

    def confirm(self, client: redis.Redis, fence: str) -> int | None:
        """How many replicas hold every write the master has taken (None when none are asked
        for): ``fence`` written, then ``WAIT``."""
        if not self.replicas:
            return None
        with client.pipeline(transaction=False) as pipe:
            return self.execute(pipe, fence=fence)[1]

    def run(
        self, client: redis.Redis, script: Script, calls: list[str], fence: str | None = None
    ) -> tuple[list[Any], int | None]:
        """Run a registered Lua ``script`` once per call (its one argument names its keys), all in
        one round trip, then wait for the replicas (after writing ``fence``, when given). Returns
        the replies and how many replicas hold them (None when none are asked for).

        EVALSHA straight into the pipeline: redis-py's script objects would add a SCRIPT EXISTS
        round trip to every batch. A call refused for a missing script (Redis restarted, or a new
        master) did nothing, so exactly those are sent again once the script is loaded."""
        replies: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _attempt in range(2):
            with client.pipeline(transaction=False) as pipe:
                for index in pending:
                    pipe.evalsha(script.sha, 0, calls[index])
                results, held = self.execute(pipe, raise_on_error=False, fence=fence)
            missing = []
            for index, result in zip(pending, results, strict=True):
                if isinstance(result, redis.exceptions.NoScriptError):
                    missing.append(index)
                elif isinstance(result, Exception):
                    raise result
                else:
                    replies[index] = result
            if not missing:
                return replies, held
            client.script_load(script.script)
            pending = missing
        raise redis.exceptions.NoScriptError("the script could not be loaded")

    def short(self, held: int | None) -> bool:
        """Whether fewer replicas than asked for hold the writes."""
        return held is not None and held < self.replicas

    def warn_if_short(self, held: int | None, what: str) -> None:
        if self.short(held):
            log.warning(
                "%s: %d of %d replicas hold it after %d ms (FLEET_REDIS_MIN_REPLICAS); a failover now "
                "would lose it",
                what,
                held,
                self.replicas,
                self.timeout_ms,
            )

"""Fixtures of the fault tests: a Redis of their own, and settings that point every worker and
client at it.

The suite's shared Redis is never touched here: the fault tests kill workers mid-job, restart
Redis and leave messages in Kombu's unacknowledged set, so they get a ``redis-server`` of their
own (append-only file fsynced on every write, so a restart loses nothing; one per xdist
process, on a free port), emptied before each test. ``fleet_settings`` is overridden, so the shared ``start_worker`` and ``client`` fixtures
of tests/conftest.py use it too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from routing.settings import Settings
from tests.faults.harness import FAULT_ADAPTER, RedisServer

# Short enough that a dead worker's jobs come back within seconds.
HEARTBEAT_TTL_S = 2.0
MAX_ATTEMPTS = 3


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long run under repeated worker kills (tests/faults/soak.py)")


@pytest.fixture(scope="session")
def fault_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("fault-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fleet_settings(fault_redis: RedisServer, small_models_dir: Path, tmp_path: Path) -> Settings:
    """The test's settings, on the suite's own Redis (emptied first: no queue, unacknowledged
    message or heartbeat of an earlier test survives)."""
    if not fault_redis.is_up():  # an earlier test left it down
        fault_redis.start()
    client = fault_redis.client()
    client.flushall()
    client.close()
    return fault_settings(fault_redis.url, small_models_dir, tmp_path)


def fault_settings(redis_url: str, small_models_dir: Path, tmp_path: Path, **extra: object) -> Settings:
    """Settings of a fault test on ``redis_url``: a key prefix of its own, local storage, the fault
    adapter on the small Z-Image-Turbo, a short heartbeat; ``extra`` over them."""
    return Settings(
        redis_url=redis_url,
        key_prefix=f"faults-{uuid.uuid4().hex[:8]}",
        storage_backend="local",
        storage_dir=tmp_path / "objects",
        model_root=small_models_dir,
        heartbeat_ttl_s=HEARTBEAT_TTL_S,
        max_attempts=MAX_ATTEMPTS,
        adapters={"z-image-turbo": FAULT_ADAPTER},
        # Loaded when the pool child starts: a job's time is its own, not a model load's.
        warm_models=["z-image-turbo"],
        **extra,
    )


@pytest.fixture
def restart_redis(fault_redis: RedisServer) -> Iterator[Callable[..., float]]:
    """Restart the suite's own Redis (same port, same AOF directory); it is up again after the
    test whatever happened."""
    yield fault_redis.restart
    if not fault_redis.is_up():
        fault_redis.start()

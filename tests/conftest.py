"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os

# One torch (OpenMP) thread per process, unless set: the suite's processes (4 xdist workers,
# their fleet workers, torchrun ranks) outnumber the cores, and OpenMP threads that spin waiting
# for each other there cost more CPU than they save (about 30% more on the model tests). Set
# before anything imports torch; the fleet's processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from localfleet import forkserver
from localfleet.process import WorkerProcess
from producer.client import Client
from routing.settings import Settings
from tests import parallel

# Loopback servers must never be reached through a proxy a CI runner may have configured.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- Parallel processes (pytest-xdist): what keeps them apart is in tests/parallel.py ----------


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return parallel.processes()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    parallel.share_run_dir(node)


def pytest_configure(config: pytest.Config) -> None:
    # Workers start forked from a fork server that has imported torch, diffusers and Celery once
    # (localfleet.forkserver): seconds of CPU less per worker, the suite's most repeated cost.
    # FLEET_TEST_COLD_WORKERS=1 starts every one as production does, ``python -m worker``; a
    # test that passes ``cold=True`` always does.
    if os.environ.get("FLEET_TEST_COLD_WORKERS", "") != "1":
        forkserver.enable()


def pytest_unconfigure(config: pytest.Config) -> None:
    parallel.remove_run_dir(config)


@pytest.hookimpl(trylast=True)  # the node ids as the controller will see them
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    parallel.record_groups(config, items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    return parallel.scheduler(config, log)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outside pytest-timeout's timer: waiting is not running
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with parallel.turn(item):
        return (yield)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answers(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # died, most likely the port was taken between probe and bind
        try:
            _no_proxy.open(url, timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    return False


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL (``http://127.0.0.1:<port>``) of a standalone moto S3 server.

    A real server over real HTTP, not moto's in-process mock, so presigned URLs and path-style
    addressing go over the wire as they do against MinIO or AWS. It does not check signatures,
    credentials or presign expiry, so tests cannot rely on it to reject a bad URL. State lives
    for the whole session: tests should use their own bucket or key prefix.
    """
    # Its log goes to a file, not a pipe: it logs every request, and a pipe nobody drains
    # fills up and stalls the server mid-test.
    log = tempfile.TemporaryFile()
    for _ in range(3):  # the free port can be taken before moto binds it; try another
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        endpoint = f"http://127.0.0.1:{port}"
        if _wait_until_answers(endpoint, proc, timeout_s=30):
            break
        proc.kill()
        proc.wait()
    else:
        log.seek(0)
        pytest.fail(f"moto server did not start:\n{log.read()[-2000:].decode(errors='replace')}")
    try:
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- The fleet under test: real Redis, real worker processes, small models ---------------------

ROOT = Path(__file__).resolve().parent.parent
# The suite owns this database of the local Redis and empties it at the start; the demo and
# anything else use database 0. Each xdist worker gets its own, counting down from it (gw0 -> 15,
# gw1 -> 14, ...).
TEST_REDIS_URL = parallel.redis_url(os.environ.get("FLEET_TEST_REDIS_URL", parallel.DEFAULT_REDIS_URL))


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis_lib.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis_lib.ConnectionError:
        pytest.fail(f"no Redis at {TEST_REDIS_URL}: `make test` starts one (scripts/ensure-redis)")
    client.flushdb()
    return TEST_REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def small_models_dir() -> Path:
    """Small random-weight models, built once and kept under var/ (the demo uses them too)."""
    return parallel.small_models(ROOT / "var" / "small-models")


def empty_queues(redis_url: str) -> None:
    """Delete every class queue and the webhook queue in ``redis_url``'s database, so messages a
    test left behind are not handed to the next test's workers."""
    client = redis_lib.Redis.from_url(redis_url)
    for pattern in ("gpu16*", "gpu80*", "h100x8*", "webhooks*"):
        for key in client.scan_iter(pattern):
            client.delete(key)
    client.close()


@pytest.fixture
def fleet_settings(redis_url: str, small_models_dir: Path, tmp_path: Path) -> Settings:
    """Settings for one test: its own key prefix and object store directory, and empty queues
    (a test that left messages behind must not hand them to the next test's workers)."""
    empty_queues(redis_url)
    return Settings(
        redis_url=redis_url,
        key_prefix=f"test-{uuid.uuid4().hex[:8]}",
        storage_backend="local",
        storage_dir=tmp_path / "objects",
        model_root=small_models_dir,
    )


@pytest.fixture
def start_worker(fleet_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers on the test's settings; all are stopped when the test ends."""
    started: list[WorkerProcess] = []

    def start(
        settings: Settings | None = None, *, module: str = "worker", cold: bool = False, **extra_env: str
    ) -> WorkerProcess:
        """``module``: the worker's entry point (``testkit.storage.SLOW_WORKER``: a slow store);
        ``cold``: started as production starts it, not forked from the fork server."""
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(settings or fleet_settings, log, extra_env, module=module, cold=cold)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def client(fleet_settings: Settings) -> Iterator[Client]:
    with Client(fleet_settings) as fleet_client:
        yield fleet_client

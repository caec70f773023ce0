"""A Flower process for a test, and reads of its HTTP API with its basic-auth credentials."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localfleet.flower import FlowerProcess
from routing.settings import Settings
from tests.conftest import _free_port

# A loopback server: never through a proxy the environment may configure.
http = httpx.Client(trust_env=False, timeout=10)


@contextlib.contextmanager
def running_flower(settings: Settings, tmp_path: Path) -> Iterator[FlowerProcess]:
    password = secrets.token_urlsafe(24)
    for attempt in range(3):  # the free port can be taken before Flower binds it; try another
        process = FlowerProcess(settings, tmp_path / f"flower-{attempt}.log", _free_port(), password)
        try:
            process.wait_ready()
            break
        except RuntimeError:
            process.stop()
    else:
        pytest.fail(f"flower did not start:\n{process.log()[-3000:]}")
    try:
        yield process
    finally:
        process.stop()


def flower_get(flower: FlowerProcess, path: str, **params: Any) -> Any:
    response = http.get(f"{flower.url}{path}", params=params, auth=flower.auth)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()


def poll(what: str, check: Callable[[], Any], flower: FlowerProcess, timeout_s: float = 60) -> Any:
    """``check()`` until it returns something truthy: Flower learns of workers and tasks from
    events and inspect replies, a few seconds after they happen."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"flower did not show {what} in {timeout_s} s (last: {last!r})\n{flower.log()[-3000:]}")


def queue_lengths(flower: FlowerProcess) -> dict[str, int]:
    return {q["name"]: q["messages"] for q in flower_get(flower, "/api/queues/length")["active_queues"]}

"""Flower as operators run it: a real Flower process (localfleet.flower.FlowerProcess) on the test
Redis, a real gpu16 worker on small models, one job submitted through the SDK. Everything is
checked through Flower's HTTP API, with and without its basic-auth credentials."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localfleet.flower import FlowerProcess, flower_command
from producer.client import Client
from producer.flower import fleet_queue_names
from routing.jobs.record import JobStatus
from routing.settings import Settings
from tests.conftest import _free_port
from tests.faults.harness import FAULT_ADAPTER
from tests.flower_api import flower_get, http, poll, queue_lengths, running_flower

pytestmark = pytest.mark.integration


@pytest.fixture
def flower(fleet_settings: Settings, tmp_path: Path) -> Iterator[FlowerProcess]:
    with running_flower(fleet_settings, tmp_path) as process:
        yield process


@pytest.mark.parametrize("credentials", [None, "", ":", "ops:", ":secret", "ops:secret,:"])
def test_flower_refuses_to_start_without_credentials(
    fleet_settings: Settings, credentials: str | None
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    env["FLEET_REDIS_URL"] = fleet_settings.redis_url
    if credentials is not None:
        env["FLOWER_BASIC_AUTH"] = credentials
    started = subprocess.run(
        flower_command(_free_port(), "127.0.0.1"), env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode != 0
    assert "Flower refuses to start without credentials" in started.stdout + started.stderr


def test_flower_shows_the_worker_the_job_and_the_queues_behind_basic_auth(
    flower: FlowerProcess, client: Client, start_worker
):
    # No worker yet: Flower lists the queues its app declares, every fleet queue, with their
    # lengths read from Redis; the job waits in gpu16.
    job = client.submit({"model": "z-image-turbo", "prompt": "x", "width": 64, "height": 64, "steps": 2})
    lengths = poll(
        "the queued job in gpu16", lambda: (q := queue_lengths(flower)).get("gpu16") == 1 and q, flower
    )
    assert set(lengths) == set(fleet_queue_names())
    assert sum(lengths.values()) == 1, lengths

    start_worker()
    record = job.wait(timeout_s=120)
    assert record.status is JobStatus.SUCCEEDED, record.error

    # The worker, as Flower's inspect sees it, consuming its class's queues.
    workers = poll(
        "the gpu16 worker",
        lambda: {
            n: w for n, w in flower_get(flower, "/api/workers", refresh=1).items() if n.startswith("gpu16@")
        },
        flower,
    )
    [(name, info)] = workers.items()
    assert {q["name"] for q in info["active_queues"]} == {"gpu16.high", "gpu16", "gpu16.low"}

    # The finished job, as a Celery task whose id is the job id.
    task = poll(
        "the finished task",
        lambda: (t := flower_get(flower, "/api/tasks").get(job.id)) and t["state"] == "SUCCESS" and t,
        flower,
    )
    assert task["uuid"] == job.id
    assert task["name"] == "fleet.run_job"
    assert task["worker"] == name

    # Queue lengths with the worker up: the queues it consumes, now empty.
    lengths = queue_lengths(flower)
    assert lengths.get("gpu16") == 0, lengths
    assert {"gpu16.high", "gpu16", "gpu16.low"} <= set(lengths)
    broker_page = http.get(f"{flower.url}/broker", auth=flower.auth)
    assert broker_page.status_code == 200 and "gpu16" in broker_page.text

    # Without credentials, or with wrong ones, nothing but the health check answers.
    for path in (
        "/api/workers",
        "/api/tasks",
        "/api/queues/length",
        f"/api/task/info/{job.id}",
        "/broker",
        "/",
    ):
        assert http.get(f"{flower.url}{path}").status_code == 401, path
        assert http.get(f"{flower.url}{path}", auth=("ops", "wrong")).status_code == 401, path
    assert http.post(f"{flower.url}/api/task/send-task/fleet.run_job", json={}).status_code == 401
    assert http.get(f"{flower.url}/healthcheck").status_code == 200


def test_flower_shows_failed_and_canceled_jobs_as_such_and_the_workers_models_and_busy_share(
    flower: FlowerProcess, client: Client, start_worker, fleet_settings: Settings
):
    start_worker(fleet_settings.model_copy(update={"adapters": {"z-image-turbo": FAULT_ADAPTER}}))
    small = {"model": "z-image-turbo", "width": 64, "height": 64, "steps": 2}
    failed = client.submit(small | {"prompt": "an unknown fault:directive=1 is a model error"})
    canceled = client.submit(small | {"prompt": "slow fault:sleep=0.5", "steps": 8})
    succeeded = client.submit(small | {"prompt": "fine"})
    assert failed.wait(timeout_s=120).error.type == "model_error"
    poll("the canceled job running", lambda: client.get(canceled.id).step >= 1, flower)
    client.cancel(canceled.id)
    assert canceled.wait(timeout_s=60).status is JobStatus.CANCELED
    assert succeeded.wait(timeout_s=60).status is JobStatus.SUCCEEDED

    def states() -> dict[str, dict[str, Any]] | None:
        tasks = flower_get(flower, "/api/tasks")
        found = {job.id: tasks.get(job.id) or {} for job in (failed, canceled, succeeded)}
        return (
            found
            if all(t.get("state") in ("SUCCESS", "FAILURE", "REVOKED") for t in found.values())
            else None
        )

    tasks = poll("every task's final state", states, flower)
    assert tasks[failed.id]["state"] == "FAILURE"
    assert tasks[failed.id]["exception"].startswith("model_error: ")
    assert tasks[canceled.id]["state"] == "REVOKED"
    assert tasks[succeeded.id]["state"] == "SUCCESS"
    # Flower's Failed filter finds the failed job, and only it.
    assert set(flower_get(flower, "/api/tasks", state="FAILURE")) == {failed.id}

    # The worker's stats (Flower's worker page) carry its pool child's models and busy share,
    # from the child's heartbeat (one beat after the jobs).
    def fleet_stats() -> dict[str, Any] | None:
        workers = flower_get(flower, "/api/workers", refresh=1)
        stats = [w.get("stats", {}).get("fleet") for n, w in workers.items() if n.startswith("gpu16@")]
        return next(
            (
                s
                for s in stats
                if s and any(c.get("gpu_busy_share") and c.get("resident") for c in s.values())
            ),
            None,
        )

    [child] = poll("the worker's fleet stats", fleet_stats, flower).values()
    assert child["resident"] == ["z-image-turbo"], child
    assert 0 < child["gpu_busy_share"] <= 1

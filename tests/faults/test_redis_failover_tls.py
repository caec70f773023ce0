"""Redis fails over with TLS everywhere: a master, two replicas and three Sentinels that speak
only TLS (replication and the Sentinels' own links included), with a certificate signed by a CA
of the test's own, and the fleet on a ``rediss://`` ``FLEET_REDIS_URL`` that names that CA beside
``FLEET_REDIS_SENTINELS``. The master is killed -9 with jobs queued and running: the Redis SDK,
the workers (their broker, and the transport that records what they hold), the API and Flower
reach the Sentinels and the new master over TLS, and no job is lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.client import Client
from routing.jobs.record import JobStatus
from routing.settings import Settings
from tests.api_tenants import SMALL, A, api_client, tenants
from tests.faults.conftest import fault_settings
from tests.faults.harness import (
    ReplicatedRedis,
    TlsFiles,
    small_request,
    wait_for,
    wait_log,
    wait_running_and_queued,
    wait_warm,
)
from tests.faults.test_redis_failover import _gpu16_length, _held_messages
from tests.flower_api import poll, running_flower

pytestmark = pytest.mark.integration


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[ReplicatedRedis]:
    group = ReplicatedRedis(tmp_path / "redis", replicas=2, sentinels=3, tls=TlsFiles.make(tmp_path / "tls"))
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def fleet_settings(replicated: ReplicatedRedis, small_models_dir: Path, tmp_path: Path) -> Settings:
    return fault_settings(
        replicated.url,  # its host is not used (the Sentinels name the master); its TLS options are
        small_models_dir,
        tmp_path,
        redis_sentinels=replicated.addresses,
        redis_sentinel_master=ReplicatedRedis.MASTER,
        redis_min_replicas=1,
        tenants=tenants("a"),
    )


def test_over_tls_every_process_follows_the_failover_and_loses_no_job(
    client: Client, start_worker, fleet_settings: Settings, replicated: ReplicatedRedis, tmp_path: Path
):
    worker = start_worker()
    wait_warm(worker)
    with api_client(fleet_settings, tmp_path) as api, running_flower(fleet_settings, tmp_path) as flower:
        through_api = api.post("/v1/jobs", json={**SMALL, "prompt": "fault:sleep=0.3"}, headers=A)
        assert through_api.status_code == 201, through_api.text
        jobs = [client.submit(small_request(f"job {i} fault:sleep=0.3", steps=6)) for i in range(6)]
        wait_running_and_queued(client, jobs, running=1, queued=3)

        replicated.kill_master()

        records = [j.wait(timeout_s=240) for j in jobs]
        assert all(r.status is JobStatus.SUCCEEDED for r in records), (records, replicated.logs())
        job_id = through_api.json()["id"]
        wait_for(
            lambda: api.get(f"/v1/jobs/{job_id}", headers=A).json()["status"] == "succeeded", 60, "API job"
        )
        with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=A) as stream:
            assert "event: succeeded" in "".join(stream.iter_text())
        # Flower reads the new master's queues over TLS (no job waits there now).
        poll("gpu16 on the new master", lambda: _gpu16_length(flower) == 0, flower)

    # The worker's broker came back through a Sentinel, over TLS, with its own transport.
    wait_log(worker, "Connected to sentinel://", count=2)
    after = [client.submit(small_request(f"after {i} fault:sleep=0.2", steps=3)) for i in range(3)]
    wait_for(lambda: _held_messages(client), 60, "messages taken after the failover recorded as held")
    assert all(j.wait(timeout_s=120).status is JobStatus.SUCCEEDED for j in after)

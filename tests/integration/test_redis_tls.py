"""The fleet on a Redis that speaks only TLS, as managed Redis services serve it: a real
``redis-server`` with a certificate signed by a CA of the test's own, and ``FLEET_REDIS_URL`` a
``rediss://`` URL that names that CA (``ssl_cert_reqs=required&ssl_ca_certs=...``).

Every process verifies the server and works: the Redis SDK; a GPU worker (Celery's broker, and
the worker's own transport that records the messages it holds); the API (its asyncio pool, behind
``Prefer: wait`` and live events); and Flower, whose queue lengths read Redis themselves and take
their TLS options from the Celery app's ``broker_use_ssl``. A client that does not trust the CA
is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from kombu.exceptions import OperationalError

from localfleet.process import ApiProcess
from producer.client import Client
from routing.celery_config import make_celery
from routing.jobs.record import JobStatus
from routing.settings import Settings
from tests.api_tenants import SMALL, A, with_tenants
from tests.faults.harness import RedisServer, TlsFiles
from tests.flower_api import flower_get, poll, queue_lengths, running_flower
from worker import held

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", tls=TlsFiles.make(tmp_path / "tls"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_every_process_speaks_tls_to_redis_and_checks_its_certificate(
    tls_redis: RedisServer, fleet_settings: Settings, start_worker, tmp_path: Path
):
    settings = with_tenants(fleet_settings, "a", redis_url=tls_redis.url, worker_class="gpu16")
    start_worker(settings)

    with Client(settings) as client:
        job = client.submit(SMALL | {"prompt": "over tls"}, tenant="a")
        assert job.wait(timeout_s=120).status is JobStatus.SUCCEEDED
        # The worker's main process took the message through the fleet's own transport.
        assert held.holders(client.store.client, client.keys) != []

    with (
        ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as api,
        httpx.Client(base_url=api.url, headers=A, timeout=90, trust_env=False) as http,
    ):
        waited = http.post("/v1/jobs", json=SMALL, headers={"Prefer": "wait=60"})
        assert waited.status_code == 201 and waited.json()["status"] == "succeeded", waited.text
        events = http.get(f"/v1/jobs/{waited.json()['id']}/events").text
        assert "event: started" in events and "event: succeeded" in events

    with running_flower(settings, tmp_path) as flower:
        assert queue_lengths(flower)["gpu16"] == 0
        workers = poll("the worker in Flower", lambda: flower_get(flower, "/api/workers"), flower)
        assert any(name.startswith("gpu16@") for name in workers)

    # The certificate is checked: without the CA, or without TLS, no connection. Celery's broker
    # checks it too where the URL does not ask for it (Kombu's own default would not).
    untrusted = tls_redis.url.partition("?")[0]
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(untrusted).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_timeout=2).ping()
    broker = make_celery(settings.model_copy(update={"redis_url": untrusted})).connection_for_write()
    with pytest.raises(OperationalError, match="certificate verify failed"):
        broker.ensure_connection(max_retries=1)
    broker.release()
    with make_celery(settings).connection_for_write() as trusted:
        trusted.ensure_connection(max_retries=1)

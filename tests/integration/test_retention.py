"""Retention as the fleet runs it: real worker processes on the local store and the test Redis,
and the lifecycle command against the moto S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from localfleet.process import settings_env
from producer.client import Client
from routing.io.retention import DAY_S, lifecycle_configuration
from routing.io.storage import LocalStorage, S3Storage
from routing.jobs.record import JobStatus
from routing.settings import Settings
from tests.faults.harness import FAULT_ADAPTER, SMALL

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _aged(storage: LocalStorage, key: str, age_s: float) -> str:
    storage.put(key, b"x", "application/octet-stream")
    then = time.time() - age_s
    os.utime(storage.root / key, (then, then))
    return key


def test_a_worker_sweeps_its_local_store_by_each_kinds_retention(start_worker, fleet_settings: Settings):
    settings = fleet_settings.model_copy(update={"retention_uploads_days": 40})
    storage = LocalStorage(settings.storage_dir)
    old_output = _aged(storage, f"jobs/{'a' * 32}/output-0.png", 9 * DAY_S)
    old_input = _aged(storage, f"inputs/tenant-a/{'b' * 32}/image.png", 8 * DAY_S)
    kept_output = _aged(storage, f"jobs/{'c' * 32}/output-0.png", 7 * DAY_S)
    kept_upload = _aged(storage, "uploads/tenant-a/old.png", 39 * DAY_S)

    start_worker(settings)

    deadline = time.monotonic() + 60
    while storage.exists(old_output) or storage.exists(old_input):
        assert time.monotonic() < deadline, storage.list()
        time.sleep(0.2)
    assert storage.list() == sorted([kept_output, kept_upload])


def test_a_worker_keeps_no_task_results(start_worker, client: Client, fleet_settings: Settings, redis_client):
    worker = start_worker(fleet_settings.model_copy(update={"adapters": {"z-image-turbo": FAULT_ADAPTER}}))
    failed = client.submit(SMALL | {"prompt": "an unknown fault:directive=1 is a model error"})
    succeeded = client.submit(SMALL | {"prompt": "fine"})
    assert failed.wait(timeout_s=120).status is JobStatus.FAILED
    assert succeeded.wait(timeout_s=60).status is JobStatus.SUCCEEDED
    worker.stop()  # every outcome it had to tell is told

    assert list(redis_client.scan_iter("celery-task-meta-*")) == []


def test_load_counts_stay_one_field_per_class_and_model_across_worker_restarts(
    start_worker, client: Client, fleet_settings: Settings, redis_client
):
    for prompt in ("first worker", "second worker"):
        worker = start_worker()
        assert client.submit(SMALL | {"prompt": prompt}).wait(timeout_s=120).status is JobStatus.SUCCEEDED
        worker.stop()

    loads = {k.decode(): int(v) for k, v in redis_client.hgetall(client.keys.load_counts).items()}
    assert loads == {"gpu16:z-image-turbo": 2}


def test_the_lifecycle_command_prints_and_applies_the_retention_rules(s3_server: str):
    settings = Settings(
        storage_backend="s3",
        s3_endpoint_url=s3_server,
        s3_bucket=f"lifecycle-{uuid.uuid4().hex[:8]}",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        retention_uploads_days=3,
    )
    storage = S3Storage(settings.s3_bucket, s3_server, access_key_id="testing", secret_access_key="testing")
    storage.ensure_bucket()

    env = settings_env(settings, {**os.environ, "PYTHONPATH": str(ROOT)})
    done = subprocess.run(
        [sys.executable, "-m", "routing", "lifecycle", "--apply"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    expected = lifecycle_configuration(settings)
    assert json.loads(done.stdout) == expected
    applied = storage.client.get_bucket_lifecycle_configuration(Bucket=settings.s3_bucket)["Rules"]
    by_prefix = {r["Filter"]["Prefix"]: r["Expiration"]["Days"] for r in applied}
    assert by_prefix == {"jobs/": 8, "inputs/": 7, "uploads/": 3, "loras/": 30}

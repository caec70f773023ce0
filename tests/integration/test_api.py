"""The HTTP API as backends use it: a real uvicorn process, real Redis, a real GPU worker, outputs
in a real S3-protocol store downloaded by their presigned URLs."""

from __future__ import annotations

import base64
import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from localfleet.process import ApiProcess
from routing.io.storage import S3Storage
from routing.jobs.codecs import encode_label
from routing.jobs.eta import _EWMA_WEIGHT as EWMA_WEIGHT
from routing.jobs.keys import Keys
from routing.jobs.workers import worker_states
from routing.settings import Settings
from tests.conftest import _free_port
from tests.faults.harness import wait_for

pytestmark = pytest.mark.integration

SMALL = {
    "model": "z-image-turbo",
    "kind": "text-to-image",
    "prompt": "a fox",
    "width": 64,
    "height": 80,
    "steps": 2,
}
SLOW = SMALL | {"width": 1024, "height": 1024, "steps": 50}


def secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@pytest.fixture
def settings(fleet_settings: Settings, s3_server: str) -> Settings:
    bucket = f"api-{uuid.uuid4().hex[:12]}"
    settings = Settings.model_validate(
        fleet_settings.model_dump()
        | {
            "storage_backend": "s3",
            "s3_endpoint_url": s3_server,
            "s3_bucket": bucket,
            "s3_access_key_id": "test",
            "s3_secret_access_key": "test",
            "metrics_port": _free_port(),
            "metrics_address": "127.0.0.1",
            "tenants": {
                "a": {
                    "api_keys": ["key-a"],
                    "webhook_secret": secret(),
                    "max_in_flight": 100,
                    "priorities": ["high", "normal", "low"],
                },
                "b": {"api_keys": ["key-b"], "webhook_secret": secret(), "max_in_flight": 1},
            },
        }
    )
    S3Storage(bucket, s3_server, access_key_id="test", secret_access_key="test").ensure_bucket()
    return settings


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as process:
        with httpx.Client(base_url=process.url, timeout=30, trust_env=False) as http:
            yield http


A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def poll(api: httpx.Client, job_id: str, headers: dict, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


def test_submit_poll_and_download_by_presigned_url(api, settings, start_worker):
    start_worker(settings)
    created = api.post("/v1/jobs", json=SMALL, headers=A)
    assert created.status_code == 201, created.text
    job = poll(api, created.json()["id"], A)

    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == {"step": 2, "total": 2, "stage": None}
    [output] = job["outputs"]
    assert output["url"].startswith(settings.s3_endpoint_url) and "X-Amz-Signature" in output["url"]
    download = httpx.get(output["url"], trust_env=False)
    assert download.status_code == 200
    assert Image.open(io.BytesIO(download.content)).size == (64, 80)


def test_idempotency_key_gives_one_job_and_one_output(api, settings, start_worker):
    start_worker(settings)
    headers = A | {"Idempotency-Key": "order-17"}
    first = api.post("/v1/jobs", json=SMALL, headers=headers)
    second = api.post("/v1/jobs", json=SMALL, headers=headers)
    other = api.post("/v1/jobs", json=SMALL | {"prompt": "another"}, headers=headers)

    assert (first.status_code, second.status_code, other.status_code) == (201, 200, 409)
    assert first.json()["id"] == second.json()["id"]
    job = poll(api, first.json()["id"], A)
    assert job["status"] == "succeeded"
    storage = S3Storage(
        settings.s3_bucket, settings.s3_endpoint_url, access_key_id="test", secret_access_key="test"
    )
    assert storage.list("jobs/") == [f"jobs/{job['id']}/attempt-1/output-0.png"]


def test_a_tenant_sees_only_its_own_jobs(api):
    job_id = api.post("/v1/jobs", json=SMALL, headers=A).json()["id"]

    assert api.get(f"/v1/jobs/{job_id}", headers=B).status_code == 404
    assert api.delete(f"/v1/jobs/{job_id}", headers=B).status_code == 404
    assert api.get(f"/v1/jobs/{job_id}/webhooks", headers=B).status_code == 404
    assert job_id not in [j["id"] for j in api.get("/v1/jobs", headers=B).json()["jobs"]]
    assert job_id in [j["id"] for j in api.get("/v1/jobs", headers=A).json()["jobs"]]
    assert api.get(f"/v1/jobs/{job_id}", headers=A).json()["status"] == "queued"  # B's cancel did nothing
    assert api.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert api.get("/v1/jobs").status_code == 401


def test_listing_pages_newest_first(api):
    ids = [api.post("/v1/jobs", json=SMALL | {"seed": i}, headers=A).json()["id"] for i in range(5)]
    first = api.get("/v1/jobs", params={"limit": 3}, headers=A).json()
    rest = api.get("/v1/jobs", params={"limit": 3, "cursor": first["next_cursor"]}, headers=A).json()
    assert [j["id"] for j in first["jobs"] + rest["jobs"]] == ids[::-1]
    assert rest["next_cursor"] is None


def test_a_listed_job_whose_record_expired_is_left_out_and_dropped_from_the_index(
    api, settings, redis_client
):
    ids = [api.post("/v1/jobs", json=SMALL | {"seed": i}, headers=A).json()["id"] for i in range(3)]
    keys = Keys(settings.key_prefix)
    redis_client.delete(keys.job(ids[1]))  # what its TTL does to a finished job's record

    listed = api.get("/v1/jobs", headers=A).json()

    assert [j["id"] for j in listed["jobs"]] == [ids[2], ids[0]]
    assert redis_client.zscore(keys.tenant_jobs("a"), ids[1]) is None
    assert redis_client.zscore(keys.tenant_jobs("a"), ids[0]) is not None


def test_in_flight_limit_answers_429_and_queues_nothing(api, redis_client):
    assert api.post("/v1/jobs", json=SMALL, headers=B).status_code == 201
    before = redis_client.llen("gpu16")
    refused = api.post("/v1/jobs", json=SMALL, headers=B)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) > 0
    assert redis_client.llen("gpu16") == before and redis_client.llen("gpu80") == 0


def test_a_high_priority_job_submitted_last_starts_next(api, settings, start_worker, redis_client):
    start_worker(settings)
    busy = api.post("/v1/jobs", json=SLOW, headers=A).json()["id"]
    deadline = time.monotonic() + 60
    while api.get(f"/v1/jobs/{busy}", headers=A).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    low = [
        api.post("/v1/jobs", json=SMALL | {"seed": i, "priority": "low"}, headers=A).json() for i in range(10)
    ]
    high = api.post("/v1/jobs", json=SMALL | {"priority": "high"}, headers=A).json()

    # While the worker is busy: the high job is first in line, the low ones behind it in order.
    assert high["queue"] == "gpu16.high" and high["queue_position"] == 0
    positions = [api.get(f"/v1/jobs/{j['id']}", headers=A).json()["queue_position"] for j in low]
    assert positions == list(range(1, 11))

    api.delete(f"/v1/jobs/{busy}", headers=A)
    finished = [poll(api, j["id"], A) for j in [high, *low]]
    assert all(j["status"] == "succeeded" for j in finished)
    starts = [j["started_at"] for j in finished]
    assert starts[0] < min(starts[1:])
    # The worker measured them: the moving average of their runs (less any model load), in the
    # order they finished, is what prices the next ETAs. (Catches a worker that records nothing,
    # a constant, or under another model or class.)
    by_end = sorted(finished, key=lambda j: j["finished_at"])
    runs = [j["timings"]["run_s"] - j["timings"].get("load_s", 0.0) for j in by_end]
    average = runs[0]
    for run_s in runs[1:]:
        average += EWMA_WEIGHT * (run_s - average)
    label = encode_label("z-image-turbo", "gpu16")
    measured = float(redis_client.hget(Keys(settings.key_prefix).durations, label))
    assert measured == pytest.approx(average, rel=0.01)  # timings are rounded to 0.1 ms
    # And prices them: with the worker busy, the n-th in line ends after n + 1 of those runs.
    busy = api.post("/v1/jobs", json=SLOW, headers=A).json()["id"]
    while api.get(f"/v1/jobs/{busy}", headers=A).json()["status"] != "running":
        assert time.monotonic() < deadline + 120
        time.sleep(0.05)
    line = [api.post("/v1/jobs", json=SMALL | {"seed": i}, headers=A).json() for i in range(3)]
    assert [(j["queue_position"], j["eta_s"]) for j in line] == [
        (n, pytest.approx((n + 1) * measured, rel=0.005)) for n in range(3)
    ]
    for job_id in [busy, *(j["id"] for j in line)]:
        api.delete(f"/v1/jobs/{job_id}", headers=A)


def test_bad_requests_name_the_field(api, redis_client):
    before = redis_client.llen("gpu16")
    cases = [
        (SMALL | {"width": 50}, "width"),
        ({k: v for k, v in SMALL.items() if k != "kind"}, "kind"),
        (SMALL | {"colour": "red"}, "colour"),
        (SMALL | {"model": "nope"}, "model"),
        (SMALL | {"webhook": {"url": "http://127.0.0.1:9/hook"}}, "webhook.url"),
        (SMALL | {"priority": "urgent"}, "priority"),
        # Animate from a photo and a video with a part of the precomputed form too.
        (
            {
                "model": "wan2.2-animate-14b",
                "kind": "animate",
                "mode": "move",
                "prompt": "a dance",
                "image": {"key": "uploads/t1/photo.png"},
                "video": {"key": "uploads/t1/dance.mp4"},
                "pose_video": {"key": "uploads/t1/pose.mp4"},
            },
            "pose_video",
        ),
    ]
    for body, field in cases:
        response = api.post("/v1/jobs", json=body, headers=A)
        assert response.status_code == 422, (body, response.text)
        assert field in [e["field"] for e in response.json()["errors"]], response.text
    assert redis_client.llen("gpu16") == before


def test_uploads_models_and_health(api):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="PNG")
    upload = api.post("/v1/uploads", content=buffer.getvalue(), headers=A | {"Content-Type": "image/png"})
    assert upload.status_code == 201 and upload.json()["key"].startswith("uploads/")
    assert api.post("/v1/uploads", content=b"not media", headers=A).status_code == 422
    models = api.get("/v1/models", headers=A).json()
    assert {m["key"] for m in models["models"]} >= {"z-image-turbo", "wan2.2-s2v-14b"}
    by_key = {m["key"]: m for m in models["models"]}
    # What a caller may name: the variants, with the steps a request naming one runs.
    assert {v["name"] for v in by_key["qwen-image-edit-2509"]["variants"]} == {"lightning-4", "lightning-8"}
    [fastwan] = by_key["wan2.2-ti2v-5b"]["variants"]
    assert fastwan == {
        "name": "fastwan-3",
        "steps": 3,
        "guidance_scale": 1.0,
        "fixed_steps": True,
        "weights": "checkpoint",
        "hub_id": "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers",
    }
    assert by_key["z-image-turbo"]["variants"] == [] and by_key["z-image-turbo"]["takes_loras"]
    assert not by_key["wan2.2-s2v-14b"]["takes_loras"]
    assert api.get("/healthz").json() == {"status": "ok"}
    assert "/v1/jobs" in api.get("/openapi.json").json()["paths"]


def test_metrics_after_a_real_job_show_its_counters(api, settings, start_worker, redis_client):
    from prometheus_client.parser import text_string_to_metric_families

    start_worker(settings.model_copy(update={"heartbeat_ttl_s": 2.0}))
    job = poll(api, api.post("/v1/jobs", json=SMALL, headers=A).json()["id"], A)
    assert job["status"] == "succeeded"
    # One more heartbeat, after the job, with the model resident (every ttl / 3 s).
    keys = Keys(settings.key_prefix)
    wait_for(
        lambda: any(state["at"] > job["finished_at"] for state in worker_states(redis_client, keys).values()),
        30,
        "a heartbeat after the job",
    )

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(
            api.get(f"http://127.0.0.1:{settings.metrics_port}/metrics").text
        )
        for s in family.samples
    }
    labels = (("class", "gpu16"), ("model", "z-image-turbo"))
    assert samples[("fleet_jobs_submitted_total", labels)] == 1
    assert samples[("fleet_jobs_finished_total", (*labels, ("status", "succeeded")))] == 1
    assert samples[("fleet_job_run_seconds_count", labels)] == 1
    assert 0 < samples[("fleet_job_run_seconds_sum", labels)] <= job["timings"]["run_s"] + 1
    assert samples[("fleet_queue_depth", (("queue", "gpu16"),))] == 0
    assert samples[("fleet_workers", (("class", "gpu16"),))] == 1
    worker_labels = next(labels for name, labels in samples if name == "fleet_gpu_work_seconds_total")
    assert dict(worker_labels)["class"] == "gpu16"
    assert (
        0
        < samples[("fleet_gpu_busy_seconds_total", worker_labels)]
        <= samples[("fleet_gpu_work_seconds_total", worker_labels)]
    )
    # The job was a cold start: its load, split into reading the weights and moving them.
    timings = job["timings"]
    assert timings["load_read_s"] + timings["load_to_device_s"] == pytest.approx(timings["load_s"], abs=1e-3)
    assert samples[("fleet_model_loads_total", labels)] == 1
    assert samples[("fleet_model_load_seconds_total", (*labels, ("phase", "read")))] > 0
    assert samples[("fleet_model_load_seconds_total", (*labels, ("phase", "to_device")))] >= 0
    resident = [labels for name, labels in samples if name == "fleet_resident_models"]
    assert any(("model", "z-image-turbo") in labels for labels in resident)
    assert (
        samples[("fleet_api_requests_total", (("method", "POST"), ("route", "/v1/jobs"), ("status", "201")))]
        == 1
    )

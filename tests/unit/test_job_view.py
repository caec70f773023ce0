"""The one JSON shape of a job: the API sends it, the HTTP SDK reads it back, webhooks carry it."""

from __future__ import annotations

import dataclasses
import json

from producer.api import create_app
from routing.errors import ErrorType, JobError
from routing.jobs.events import Webhook
from routing.jobs.record import JobRecord, JobStatus, JobView, Output
from routing.settings import Settings

# The fields the API has always sent, and the record's real updated_at.
API_FIELDS = {
    "id",
    "model",
    "kind",
    "status",
    "priority",
    "attempt",
    "progress",
    "queue",
    "queue_position",
    "eta_s",
    "outputs",
    "error",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "timings",
    "webhook",
    "request",
}


def _record() -> JobRecord:
    return JobRecord(
        id="a" * 32,
        model="z-image-turbo",
        kind="text-to-image",
        request={"model": "z-image-turbo", "prompt": "a fox"},
        status=JobStatus.FAILED,
        queue="gpu80.high",
        attempt=2,
        step=3,
        total_steps=8,
        stage="preprocess.pose",
        created_at=1700000000.25,
        updated_at=1700000042.5,
        started_at=1700000001.0,
        finished_at=1700000042.5,
        outputs=[Output("jobs/a/attempt-2/output-0.png", "image/png", 1234, 512, 512, seed=7)],
        error=JobError(type=ErrorType.OUT_OF_MEMORY, exception="OutOfMemoryError", message="oom", where="x"),
        timings={"run_s": 41.5},
        worker="gpu80@host:1:ab",
        tenant="acme",
        priority="high",
        webhook=Webhook("https://example.com/hook", ("succeeded", "failed")),
    )


def test_a_view_goes_to_json_and_back_unchanged():
    view = JobView.of(_record(), queue_position=None, eta_s=12.5)
    data = view.to_json()
    assert JobView.from_json(json.loads(json.dumps(data))) == view
    assert JobView.from_json(data, created=False) == dataclasses.replace(view, created=False)


def test_the_json_has_the_apis_fields_and_values():
    data = JobView.of(_record()).to_json()
    assert set(data) == API_FIELDS
    assert data["status"] == "failed"
    assert data["progress"] == {"step": 3, "total": 8, "stage": "preprocess.pose"}
    assert data["error"] == {
        "type": "out_of_memory",
        "exception": "OutOfMemoryError",
        "message": "oom",
        "where": "x",
    }
    assert data["webhook"] == {"url": "https://example.com/hook", "events": ["succeeded", "failed"]}
    assert data["outputs"][0] == {
        "key": "jobs/a/attempt-2/output-0.png",
        "content_type": "image/png",
        "size_bytes": 1234,
        "width": 512,
        "height": 512,
        "seed": 7,
        "frames": None,
        "fps": None,
        "cache": None,
        "url": None,
    }
    assert data["updated_at"] == 1700000042.5  # the record's, not made up from the others
    # Nothing only the fleet keeps goes out.
    assert "acme" not in json.dumps(data) and "gpu80@host" not in json.dumps(data)


def test_the_apis_documented_job_is_this_shape():
    schemas = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()["components"]["schemas"]
    assert set(schemas["JobOut"]["properties"]) == API_FIELDS

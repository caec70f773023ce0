"""One text-to-image job end to end: real Redis, a real Celery worker process, the real
ZImagePipeline on small random weights, a real object store directory."""

from __future__ import annotations

import io
import re
import time

import pytest
from PIL import Image

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.events import EventType
from routing.jobs.record import JobStatus

pytestmark = pytest.mark.integration


def test_submit_runs_to_succeeded_with_a_png_of_the_requested_size(
    client: Client, start_worker, fleet_settings
):
    # Started as production starts it (``python -m worker``): the suite's other workers are
    # forked from a fork server that has imported the libraries already (tests/conftest.py).
    start_worker(cold=True)
    job = client.submit(
        {"model": "z-image-turbo", "prompt": "a red fox in snow", "width": 96, "height": 64, "steps": 4}
    )

    record = job.wait(timeout_s=120)

    assert record.status is JobStatus.SUCCEEDED, record.error
    assert record.attempt == 1
    [output] = record.outputs
    data = LocalStorage(fleet_settings.storage_dir).get(output.key)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (96, 64)
    assert (output.width, output.height) == (96, 64)
    assert output.key == f"jobs/{job.id}/attempt-1/output-0.png"
    assert output.seed is not None

    # Progress went through every step, in order, while the job ran.
    steps = [int(e["step"]) for e in client.store.events(job.id) if e["type"] == EventType.PROGRESS.value]
    assert steps == [1, 2, 3, 4]
    assert (record.step, record.total_steps) == (4, 4)
    types = [e["type"] for e in client.store.events(job.id) if e["type"] != EventType.PROGRESS.value]
    assert types == ["job.queued", "job.started", "job.succeeded"]

    # Timings: when it was queued, started, finished, and where the time went.
    assert record.created_at <= record.started_at <= record.finished_at
    for name in ("queue_wait_s", "inference_s", "encode_s", "store_s", "run_s"):
        assert record.timings[name] >= 0, name
    assert record.timings["run_s"] >= record.timings["inference_s"]

    # The SDK hands back a URL that opens the same bytes.
    [result] = job.result()
    assert result.url.startswith("file://")
    assert result.content_type == "image/png"
    assert result.seed == output.seed and result.size_bytes == output.size_bytes


def test_second_job_on_the_same_model_loads_nothing(
    client: Client, start_worker, redis_client, fleet_settings
):
    start_worker()
    first = client.submit({"model": "z-image-turbo", "prompt": "one", "width": 64, "height": 64, "steps": 2})
    first_record = first.wait(timeout_s=120)
    second = client.submit({"model": "z-image-turbo", "prompt": "two", "width": 64, "height": 64, "steps": 2})
    second_record = second.wait(timeout_s=60)

    assert first_record.status is second_record.status is JobStatus.SUCCEEDED
    assert "load_s" in first_record.timings
    assert "load_s" not in second_record.timings
    loads = {k.decode(): int(v) for k, v in redis_client.hgetall(client.keys.load_counts).items()}
    assert len(loads) == 1 and list(loads.values()) == [1], loads
    assert next(iter(loads)).endswith(":z-image-turbo")
    assert first_record.worker == second_record.worker


def test_the_seed_makes_the_image_reproducible(client: Client, start_worker, fleet_settings):
    start_worker()
    request = {
        "model": "z-image-turbo",
        "prompt": "a lighthouse",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 7,
    }
    records = [client.submit(request).wait(timeout_s=120) for _ in range(2)]
    other = client.submit(request | {"seed": 8}).wait(timeout_s=60)

    storage = LocalStorage(fleet_settings.storage_dir)
    first, again, different = (storage.get(r.outputs[0].key) for r in (*records, other))
    assert first == again
    assert first != different


def test_cli_submit_wait_prints_progress_and_where_the_output_is(fleet_settings, start_worker, monkeypatch):
    import io as text_io

    from producer import cli
    from routing import settings as settings_module

    start_worker()
    monkeypatch.setattr(settings_module, "get_settings", lambda: fleet_settings)
    monkeypatch.setattr("producer.client.get_settings", lambda: fleet_settings)
    out, err = text_io.StringIO(), text_io.StringIO()
    started = time.monotonic()

    code = cli.main(
        [
            "submit",
            "z-image-turbo",
            "--prompt",
            "a cat",
            "--width",
            "64",
            "--height",
            "80",
            "--steps",
            "3",
            "--wait",
        ],
        out=out,
        err=err,
    )

    assert code == 0, err.getvalue()
    assert time.monotonic() - started < 120
    lines = out.getvalue().splitlines()
    job_id = lines[0]
    assert lines[1].startswith("output: file://")
    assert re.search(r" image/png 64x80 seed \d+$", lines[1])
    assert f"jobs/{job_id}/attempt-1/output-0.png" in lines[1]
    assert "3/3 steps succeeded" in err.getvalue()

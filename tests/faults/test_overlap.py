"""The GPU does not wait on the CPU, and nothing is lost for it: a job's outputs are stored on
the finisher's thread while the next job generates, a kill during that store loses nothing and
adds no second output, and decoding a low job's inputs ahead does not let it pass a high job
queued after it."""

from __future__ import annotations

import re

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from testkit.storage import SLOW_WORKER
from tests.faults.harness import event_types, kill_group, small_request, wait_for, wait_log, wait_warm
from tests.integration.test_every_kind import picture

# alone: one job must be stepping while the other one's store sleeps (tests/parallel.py).
pytestmark = [pytest.mark.integration, pytest.mark.alone]

PUT_S = 3.0


def _put_returned_at(log: str, job_id: str) -> float:
    [at] = re.findall(rf"slow store: put jobs/{job_id}/attempt-1/output-0.png returned at ([0-9.]+)", log)
    return float(at)


def _first_step_at(client: Client, job_id: str) -> float:
    return min(float(e["at"]) for e in client.store.events(job_id) if e["type"] == "job.progress")


def test_a_slow_store_does_not_hold_back_the_next_jobs_pipeline_call(client: Client, start_worker):
    worker = start_worker(module=SLOW_WORKER, FAULT_STORE_PUT_S=str(PUT_S))
    wait_warm(worker)
    first = client.submit(small_request("stored slowly"))
    second = client.submit(small_request("generated meanwhile fault:sleep=0.2", steps=4))

    one, two = first.wait(timeout_s=120), second.wait(timeout_s=120)
    assert one.status is two.status is JobStatus.SUCCEEDED, (one.error, two.error)
    # The second job's pipeline was stepping while the first one's put was still sleeping...
    assert _first_step_at(client, second.id) < _put_returned_at(worker.log(), first.id) - 1.0
    # ...and the first job was recorded succeeded only once its put had returned.
    assert one.finished_at >= _put_returned_at(worker.log(), first.id)
    assert one.timings["store_s"] >= PUT_S
    assert [o.key for o in one.outputs] == [f"jobs/{first.id}/attempt-1/output-0.png"]


def test_kill_9_during_the_overlapped_store_loses_nothing_and_adds_no_output(
    client: Client, start_worker, fleet_settings
):
    first_worker = start_worker(module=SLOW_WORKER, FAULT_STORE_PUT_S="30")
    wait_warm(first_worker)
    stored = client.submit(small_request("killed while its output is stored"))
    generating = client.submit(small_request("killed while it generates fault:sleep=0.5", steps=8))
    wait_log(first_worker, f"slow store: put jobs/{stored.id}/attempt-1/output-0.png started", timeout_s=60)
    wait_for(lambda: client.get(generating.id).step >= 1, 60, "the next job generating")
    assert client.get(stored.id).status is JobStatus.RUNNING  # generated, not yet stored

    kill_group(first_worker)
    start_worker()  # a plain store: the reaper hands both jobs back and it runs them
    records = [stored.wait(timeout_s=120), generating.wait(timeout_s=120)]

    storage = LocalStorage(fleet_settings.storage_dir)
    for job, record in zip([stored, generating], records, strict=True):
        assert record.status is JobStatus.SUCCEEDED, record.error
        assert record.attempt == 2
        assert record.handed_back and record.handed_back.endswith("died")
        assert storage.list(f"jobs/{job.id}/") == [f"jobs/{job.id}/attempt-2/output-0.png"]
        assert event_types(client.store, job.id) == [
            "job.queued", "job.started", "job.queued", "job.started", "job.succeeded"
        ]  # fmt: skip


def test_a_high_job_queued_later_runs_before_a_low_job_decoded_ahead(
    client: Client, start_worker, fleet_settings
):
    worker = start_worker(
        fleet_settings.model_copy(update={"warm_models": ["z-image-turbo", "wan2.2-ti2v-5b"]})
    )
    wait_log(worker, "loaded wan2.2-ti2v-5b", timeout_s=180)
    running = client.submit(small_request("holds the GPU fault:sleep=0.5", steps=12))
    wait_for(lambda: client.get(running.id).status is JobStatus.RUNNING, 60, "the first job running")
    low = client.submit(
        {
            "model": "wan2.2-ti2v-5b",
            "kind": "image-to-video",
            "prompt": "low, with an image to decode",
            "image": client.upload(picture(60)),
            "width": 64,
            "height": 64,
            "frames": 5,
            "steps": 2,
        },
        priority="low",
    )
    # A step of the first job finds the low job at the head of the queues and decodes its image.
    wait_log(worker, f"decoded the inputs of job {low.id} ahead", timeout_s=60)
    assert client.get(running.id).status is JobStatus.RUNNING
    high = client.submit(small_request("high, queued later"), priority="high")

    first, low_record, high_record = (j.wait(timeout_s=180) for j in (running, low, high))
    assert first.status is low_record.status is high_record.status is JobStatus.SUCCEEDED
    assert high_record.started_at < low_record.started_at
    # The low job ran on the inputs decoded ahead.
    assert "inputs_ahead_s" in low_record.timings

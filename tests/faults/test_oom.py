"""CUDA out of memory on a gpu16 worker: the job moves to the gpu80 queue (once per class) and
succeeds there."""

from __future__ import annotations

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.harness import event_types, small_request, wait_for, wait_warm

pytestmark = pytest.mark.integration


def test_cuda_oom_on_gpu16_escalates_to_gpu80_and_succeeds_there(
    client: Client, start_worker, fleet_settings, fault_redis
):
    small = start_worker()
    wait_warm(small)
    job = client.submit(small_request("too big for 16 GB fault:oom-on=gpu16"))

    # Escalated: queued on gpu80, where no worker is yet.
    record = wait_for(lambda: (r := client.get(job.id)).queue == "gpu80" and r, 60, "job escalated to gpu80")
    assert record.status is JobStatus.QUEUED
    assert [(e["from"], e["to"]) for e in record.escalations] == [("gpu16", "gpu80")]
    assert record.error.type == "out_of_memory" and record.error.exception == "OutOfMemoryError"
    assert event_types(client.store, job.id) == ["job.queued", "job.started", "job.queued"]
    assert fault_redis.client().llen("gpu80") == 1
    # The worker logs the escalation after the store has made it: wait for the line.
    wait_for(lambda: "ran out of memory on gpu16; escalated to gpu80" in small.log(), 30, "escalation logged")
    gpu16_worker = record.worker

    big = start_worker(fleet_settings.model_copy(update={"worker_class": "gpu80"}))
    final = job.wait(timeout_s=120)

    assert final.status is JobStatus.SUCCEEDED, final.error
    assert final.queue == "gpu80"
    assert final.worker.startswith("gpu80@") and gpu16_worker.startswith("gpu16@")
    assert final.attempt == 2
    assert [(e["from"], e["to"]) for e in final.escalations] == [("gpu16", "gpu80")]
    assert event_types(client.store, job.id) == [
        "job.queued", "job.started", "job.queued", "job.started", "job.succeeded"
    ]  # fmt: skip
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == [
        f"jobs/{job.id}/attempt-2/output-0.png"
    ]
    assert f"run_job[{job.id}] received" in big.log()


def test_cuda_oom_on_every_class_escalates_once_per_class_then_fails(
    client: Client, start_worker, fleet_settings
):
    # A gpu80 worker also takes gpu16 work: the job runs out of memory on the gpu16 queue, then
    # on gpu80, and waits for h100x8, the biggest class; out of memory there too, it fails.
    start_worker(fleet_settings.model_copy(update={"worker_class": "gpu80"}))
    job = client.submit(small_request("too big for anything fault:oom-on=gpu16,gpu80,h100x8"))
    record = wait_for(lambda: (r := client.get(job.id)).queue == "h100x8" and r, 90, "escalated to h100x8")
    assert record.status is JobStatus.QUEUED and record.attempt == 2
    assert [(e["from"], e["to"]) for e in record.escalations] == [("gpu16", "gpu80"), ("gpu80", "h100x8")]

    start_worker(fleet_settings.model_copy(update={"worker_class": "h100x8", "group_models": []}))
    final = job.wait(timeout_s=120)
    assert final.status is JobStatus.FAILED
    assert final.error.type == "out_of_memory"
    assert final.attempt == 3 and final.worker.startswith("h100x8@")
    assert len(final.escalations) == 2
    assert event_types(client.store, job.id).count("job.queued") == 3


def test_a_job_that_succeeds_after_escalating_reports_no_error(client: Client, start_worker, fleet_settings):
    start_worker()
    job = client.submit(small_request("too big for 16 GB fault:oom-on=gpu16"))
    wait_for(lambda: client.get(job.id).queue == "gpu80", 60, "job escalated to gpu80")
    start_worker(fleet_settings.model_copy(update={"worker_class": "gpu80"}))
    final = job.wait(timeout_s=120)
    assert final.status is JobStatus.SUCCEEDED and len(final.escalations) == 1
    assert final.error is None, final.error

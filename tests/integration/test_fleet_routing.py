"""Routing through the real broker: classes, spillover to idle bigger workers, own queue first,
and the resident pool's evictions in a real worker."""

from __future__ import annotations

import pytest

from producer.client import Client
from routing.catalog import footprint_gb, get_model
from routing.classes import VramClass
from routing.jobs.record import JobStatus

pytestmark = pytest.mark.integration

Z_IMAGE = {"model": "z-image-turbo", "prompt": "a fox", "width": 64, "height": 64, "steps": 2}
QWEN = {"model": "qwen-image", "prompt": "a fox", "width": 64, "height": 64, "steps": 2}


def queued(redis_client) -> dict[str, int]:
    return {name: redis_client.llen(name) for name in ("gpu16", "gpu80", "h100x8")}


def test_jobs_queue_by_class_and_work(client: Client, redis_client):
    client.submit(Z_IMAGE)
    client.submit(QWEN)
    video = {
        "model": "wan2.2-ti2v-5b",
        "kind": "text-to-video",
        "prompt": "waves",
        "width": 1280,
        "height": 704,
    }
    client.submit(video | {"frames": 121})  # the native clip: 16 GB class, offloaded
    # Z-Image at 2048x2048 with guidance (two batched passes): its predicted peak outgrows 16 GiB.
    client.submit(Z_IMAGE | {"width": 2048, "height": 2048, "guidance_scale": 4.0})
    assert queued(redis_client) == {"gpu16": 2, "gpu80": 2, "h100x8": 0}


def test_a_16gb_job_runs_on_an_idle_80gb_worker(client: Client, start_worker, fleet_settings):
    start_worker(fleet_settings.model_copy(update={"worker_class": "gpu80"}))
    record = client.submit(Z_IMAGE).wait(timeout_s=120)
    assert record.status is JobStatus.SUCCEEDED
    assert record.queue == "gpu16"
    assert record.worker.startswith("gpu80@")


def test_a_bigger_worker_takes_its_own_queue_first(client: Client, start_worker, fleet_settings):
    small = [client.submit(Z_IMAGE | {"seed": i}) for i in range(3)]
    own = client.submit(QWEN)
    start_worker(
        fleet_settings.model_copy(
            update={"worker_class": "gpu80", "warm_models": ["qwen-image", "z-image-turbo"]}
        )
    )
    records = [job.wait(timeout_s=180) for job in [*small, own]]
    assert all(r.status is JobStatus.SUCCEEDED for r in records)
    first = min(records, key=lambda r: r.started_at)
    assert first.id == own.id


def test_pool_evicts_least_recently_used_within_its_budget(
    client: Client, start_worker, fleet_settings, redis_client
):
    # Footprints predicted on gpu80 (routing.memory): a budget of 102 GiB holds Z-Image beside
    # either Qwen model, never both Qwen models (asserted on the figures themselves below).
    z, qwen, edit_gib = (
        footprint_gb(get_model(key), VramClass.GPU80) or 0.0
        for key in ("z-image-turbo", "qwen-image", "qwen-image-edit")
    )
    assert z + max(qwen, edit_gib) <= 102 < qwen + edit_gib
    start_worker(fleet_settings.model_copy(update={"worker_class": "gpu80", "vram_budget_gb": 102}))
    edit = {"model": "qwen-image-edit", "prompt": "a hat", "width": 64, "height": 64, "steps": 2}
    from tests.integration.test_every_kind import picture

    edit["images"] = [client.upload(picture(50))]
    for request in [Z_IMAGE, QWEN, Z_IMAGE, edit, QWEN]:
        assert client.submit(request).wait(timeout_s=180).status is JobStatus.SUCCEEDED

    def counts(key: str) -> dict[str, int]:
        return {k.decode().rsplit(":", 1)[1]: int(v) for k, v in redis_client.hgetall(key).items()}

    assert counts(client.keys.load_counts) == {"z-image-turbo": 1, "qwen-image": 2, "qwen-image-edit": 1}
    # The edit model pushes out qwen-image (least recently used); qwen-image back pushes out both.
    assert counts(client.keys.eviction_counts) == {"qwen-image": 1, "z-image-turbo": 1, "qwen-image-edit": 1}

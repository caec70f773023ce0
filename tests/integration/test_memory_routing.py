"""Routing by predicted peak at submit, through the SDK and the HTTP API: a request goes to the
smallest class whose card holds it, and one no class holds is refused naming what fits, with
nothing queued. Real Redis, a real uvicorn process, no GPU worker (jobs stay queued)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from localfleet.process import ApiProcess
from producer.client import Client
from routing.catalog import get_model
from routing.classes import VramClass
from routing.errors import InvalidRequest
from routing.memory import Work, predict
from routing.settings import Settings

pytestmark = pytest.mark.integration

BIG_QWEN = {"model": "qwen-image", "kind": "text-to-image", "prompt": "a fox", "width": 2048, "height": 2048}


def margin_just_below_fit() -> float:
    """A margin that leaves an 80 GiB card a hair too small for qwen-image at 2048x2048."""
    peak = predict(get_model("qwen-image"), VramClass.GPU80, Work(2048, 2048, 0, True))
    assert peak is not None
    return round(80 - peak.peak_gib + 0.05, 2)


def queued(redis_client) -> dict[bytes, int]:
    return {k: redis_client.llen(k) for k in redis_client.keys("gpu*") + redis_client.keys("h100x8*")}


@pytest.fixture
def tight(fleet_settings: Settings) -> Settings:
    return Settings.model_validate(
        fleet_settings.model_dump()
        | {
            "vram_margin_gib": margin_just_below_fit(),
            "tenants": {"a": {"api_keys": ["key-a"], "webhook_secret": "whsec_" + "a" * 32}},
        }
    )


def test_the_sdk_queues_each_request_on_the_smallest_class_that_holds_it(client: Client, redis_client):
    z = {"model": "z-image-turbo", "prompt": "a fox", "width": 2048, "height": 2048}
    for request, queue in [(z, "gpu16"), (z | {"guidance_scale": 4.0}, "gpu80"), (BIG_QWEN, "gpu80")]:
        before = redis_client.llen(queue)
        client.submit(request)
        assert redis_client.llen(queue) == before + 1, request


def test_the_sdk_refuses_what_no_class_holds_and_queues_nothing(tight: Settings, redis_client):
    before, records = queued(redis_client), len(redis_client.keys(f"{tight.key_prefix}:job:*"))
    with Client(tight) as client, pytest.raises(InvalidRequest) as refused:
        client.submit(BIG_QWEN)
    assert refused.value.fields == ["width"]
    assert "at most 2032x2032" in str(refused.value)
    assert queued(redis_client) == before
    assert len(redis_client.keys(f"{tight.key_prefix}:job:*")) == records
    # The size it names is taken.
    with Client(tight) as client:
        client.submit(BIG_QWEN | {"width": 2032, "height": 2032})
    assert redis_client.llen("gpu80") == before.get(b"gpu80", 0) + 1


@pytest.fixture
def api(tight: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    with ApiProcess(tight, tmp_path / "api.log").wait_ready(60) as process:
        with httpx.Client(base_url=process.url, timeout=30, trust_env=False) as http:
            yield http


def test_the_api_answers_422_naming_the_largest_size_that_fits(api: httpx.Client, redis_client):
    before = queued(redis_client)
    response = api.post("/v1/jobs", json=BIG_QWEN, headers={"Authorization": "Bearer key-a"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error["field"] == "width" and "at most 2032x2032" in error["message"]
    assert queued(redis_client) == before

"""The OpenAI-compatible Images API through the OpenAI Python SDK itself, against a real uvicorn API
process, a real GPU worker process (gpu80: it serves the 16 GB class too), real Redis and the local
object store: images made and edited by the fleet's small models come back as OpenAI answers;
refusals are OpenAI errors naming the OpenAI field, with nothing queued or stored; a job that
outlasts the wait is a 408 the SDK does not retry."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest
from PIL import Image

from localfleet.process import ApiProcess
from routing.catalog import CATALOG
from routing.io.storage import LocalStorage
from routing.settings import Settings
from tests.api_tenants import with_tenants
from worker.media import encode_png

pytestmark = pytest.mark.integration

KEY = "key-a"
PNG = encode_png(Image.new("RGB", (64, 64), (10, 200, 30)))


def _settings(fleet_settings: Settings, **update: object) -> Settings:
    return with_tenants(fleet_settings, "a", **update)


@pytest.fixture
def settings(fleet_settings: Settings) -> Settings:
    return _settings(fleet_settings, worker_class="gpu80")


@pytest.fixture
def api_url(settings: Settings, tmp_path: Path) -> Iterator[str]:
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as process:
        yield process.url


def _sdk(api_url: str, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key=KEY, max_retries=max_retries, timeout=300)


def _image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _jobs(api_url: str) -> list[dict]:
    return httpx.get(
        f"{api_url}/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}, trust_env=False
    ).json()["jobs"]


def test_the_openai_sdk_makes_and_edits_images_with_the_fleets_models(api_url, settings, start_worker):
    start_worker(settings)
    sdk = _sdk(api_url)
    # The SDK's models.list() names the models the fleet serves (not the unreleased ones), as
    # OpenAI's API shapes them; the fleet's own catalog stays beside them in the same answer.
    served = [key for key, spec in CATALOG.items() if spec.served and spec.released]
    listed = list(sdk.models.list())
    assert [m.id for m in listed] == served and "z-image-edit" not in served
    assert {m.object for m in listed} == {"model"} and all(m.created > 0 for m in listed)
    qwen = sdk.models.retrieve("qwen-image-edit-2509")
    assert (qwen.id, qwen.owned_by) == ("qwen-image-edit-2509", "Qwen")
    for unknown in ("z-image-edit", "dall-e-3"):
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.models.retrieve(unknown)
        assert missing.value.body["code"] == "model_not_found"
    catalog = httpx.get(f"{api_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, trust_env=False)
    assert [m["key"] for m in catalog.json()["models"]] == list(CATALOG)

    made = sdk.images.generate(
        model="z-image-turbo", prompt="a red fox", size="64x64", n=2, response_format="b64_json"
    )
    assert len(made.data) == 2 and made.size == "64x64" and made.output_format == "png"
    for item in made.data:
        assert _image(base64.b64decode(item.b64_json)).size == (64, 64)
    # The fleet's own fields beyond OpenAI's: the same seed makes the same image.
    seeded = dict(
        prompt="a red fox", size="64x64", response_format="b64_json", extra_body={"seed": 5, "steps": 2}
    )
    assert sdk.images.generate(**seeded).data == sdk.images.generate(**seeded).data
    # The default model and answer form: a presigned URL of the stored output.
    # With the fleet's webhook, sent as JSON.
    hook = {"url": "https://93.184.215.14/fleet", "events": ["succeeded"]}
    linked = sdk.images.generate(prompt="a lighthouse", size="64x80", extra_body={"webhook": hook})
    [item] = linked.data
    assert item.url.startswith("file://")  # the local store's URL (S3's is a presigned one)
    assert _image(Path(urlparse(item.url).path).read_bytes()).size == (64, 80)
    edit = dict(
        model="qwen-image-edit-2509",
        image=[("a.png", PNG, "image/png"), ("b.png", PNG, "image/png")],
        prompt="put them side by side",
        size="64x64",
        response_format="b64_json",
        output_format="webp",
        extra_body={"webhook": hook},  # as webhook[url] and webhook[events][] parts
        extra_headers={"Idempotency-Key": "edit-1"},
    )
    edited = sdk.images.edit(**edit)
    [item] = edited.data
    assert edited.output_format == "webp" and _image(base64.b64decode(item.b64_json)).format == "WEBP"
    # The same call again (its answer lost, say): the same job's images; the images it sent
    # again are not kept. The first call's are the job's inputs.
    store = LocalStorage(settings.storage_dir)
    assert sdk.images.edit(**edit).data == edited.data
    kept = sorted(store.list("inputs/"))
    assert len(kept) == 2 and all(store.get(key) == PNG for key in kept) and store.list("uploads/") == []
    with pytest.raises(openai.ConflictError):  # the same key for another edit: not retried
        sdk.images.edit(**(edit | {"prompt": "one behind the other"}))
    # The same fields with another image: another edit too, told by the bytes of the images.
    other = encode_png(Image.new("RGB", (64, 64), (200, 10, 30)))
    with pytest.raises(openai.ConflictError):
        sdk.images.edit(**(edit | {"image": [("a.png", PNG, "image/png"), ("b.png", other, "image/png")]}))
    with pytest.raises(openai.ConflictError):  # or fewer of them
        sdk.images.edit(**(edit | {"image": [("a.png", PNG, "image/png")]}))
    with pytest.raises(openai.ConflictError):  # or its events sent elsewhere
        sdk.images.edit(**(edit | {"extra_body": {"webhook": hook | {"events": ["failed"]}}}))
    assert store.list("inputs/") == kept
    # Each call was one job of the tenant's, seen by the fleet's own API as any other.
    jobs = _jobs(api_url)
    assert sorted(j["model"] for j in jobs) == ["qwen-image-edit-2509"] + ["z-image-turbo"] * 4
    assert sum(j["request"]["seed"] == 5 and j["request"]["steps"] == 2 for j in jobs) == 2
    edit = next(j for j in jobs if j["model"] == "qwen-image-edit-2509")
    assert sorted(image["key"] for image in edit["request"]["images"]) == kept
    # Deleted through the fleet's API, the edit takes its images with it.
    for _ in range(2):  # the second as a retry after a lost answer would be: answered alike
        purged = httpx.delete(
            f"{api_url}/v1/jobs/{edit['id']}?purge=true",
            headers={"Authorization": f"Bearer {KEY}"},
            trust_env=False,
        )
        assert purged.status_code == 204, purged.text
    assert store.list("inputs/") == [] and store.list(f"jobs/{edit['id']}/") == []
    assert len(edit["request"]["images"]) == 2 and all(j["status"] == "succeeded" for j in jobs)
    assert [j["webhook"] for j in jobs if j.get("webhook")] == [hook, hook]  # the edit's, the lighthouse's


def test_a_refused_call_is_an_openai_error_naming_its_field_and_nothing_is_queued_or_stored(
    api_url, settings
):
    sdk = _sdk(api_url)

    with pytest.raises(openai.BadRequestError) as size:
        sdk.images.generate(model="z-image-turbo", prompt="a fox", size="65x64")
    assert size.value.body["param"] == "size" and "multiple of 16" in size.value.body["message"]
    with pytest.raises(openai.BadRequestError) as quality:
        sdk.images.generate(model="z-image-turbo", prompt="a fox", quality="hd")
    assert quality.value.body["param"] == "quality" and "not supported" in quality.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_many:
        sdk.images.generate(model="z-image-turbo", prompt="a fox", n=settings.max_num_outputs + 1)
    assert too_many.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as several:
        sdk.images.edit(image=("a.png", PNG, "image/png"), prompt="a hat", n=2)
    assert several.value.body["param"] == "n"
    # An edit's images are stored as it is read: refused, they are deleted again.
    with pytest.raises(openai.BadRequestError) as edit:
        sdk.images.edit(image=("a.png", PNG, "image/png"), prompt="a hat", size="64x65")
    assert edit.value.body["param"] == "size", edit.value.body
    with pytest.raises(openai.BadRequestError) as not_an_image:
        sdk.images.edit(image=("a.png", b"not a png", "image/png"), prompt="a hat")
    assert not_an_image.value.body["param"] == "image"
    # JSON's types are held to, as in POST /v1/jobs: no true for 1, no "5" for 5.
    for extra in ({"guidance_scale": False}, {"seed": "5"}, {"n": True}):
        with pytest.raises(openai.BadRequestError) as typed:
            sdk.images.generate(prompt="a fox", extra_body=extra)
        assert typed.value.body["param"] == next(iter(extra))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api_url}/v1", api_key="wrong", max_retries=0).images.generate(
            prompt="a fox"
        )

    assert _jobs(api_url) == []
    assert LocalStorage(settings.storage_dir).list("inputs/") == []
    assert LocalStorage(settings.storage_dir).list("uploads/") == []


def test_a_job_that_outlasts_the_wait_is_a_408_the_sdk_does_not_retry(fleet_settings, tmp_path):
    settings = _settings(fleet_settings, openai_wait_s=1)  # and no worker: the job stays queued
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as process:
        with pytest.raises(openai.APIStatusError) as waited:
            _sdk(process.url, max_retries=2).images.generate(prompt="a fox", size="64x64")
        [job] = _jobs(process.url)  # queued once, though the SDK may retry twice

    assert waited.value.status_code == 408
    assert waited.value.response.headers["Fleet-Job-Id"] == job["id"] and job["status"] == "queued"
    assert f"GET /v1/jobs/{job['id']}" in waited.value.body["message"]

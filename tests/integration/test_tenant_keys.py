"""Store keys belong to a tenant, through a real uvicorn API process, real Redis, a real GPU
worker where outputs are needed, the local object store, and a real HTTP server on loopback for
media given by URL. One tenant cannot name another's uploads or outputs, nor tell them from keys
that do not exist; and a refused request leaves nothing stored."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from producer.client import Client
from routing.errors import InvalidRequest
from routing.io.net import UrlPolicy
from routing.io.storage import LocalStorage
from routing.settings import Settings
from testkit.small_models.lora import build_lora
from tests.api_tenants import SMALL, A, B, api_client, webhook_secret
from worker.media import encode_png

pytestmark = pytest.mark.integration

PNG = encode_png(Image.new("RGB", (64, 64), (10, 200, 30)))
EDIT = {"model": "qwen-image-edit", "kind": "edit", "prompt": "add a hat", "width": 64, "height": 64}


class PngServer:
    """Serves the PNG on 127.0.0.2 (the address the tests' URL policy allows) and counts fetches."""

    def __init__(self) -> None:
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.httpd.server_port}/img.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def png_server() -> Iterator[PngServer]:
    server = PngServer()
    yield server
    server.close()


@pytest.fixture
def settings(fleet_settings: Settings) -> Settings:
    return Settings.model_validate(
        fleet_settings.model_dump()
        | {
            "tenants": {
                "a": {"api_keys": ["key-a"], "webhook_secret": webhook_secret(), "max_in_flight": 100},
                "b": {"api_keys": ["key-b"], "webhook_secret": webhook_secret(), "max_in_flight": 1},
            },
            "url_allow_cidrs": ["127.0.0.2/32"],
        }
    )


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    with api_client(settings, tmp_path) as http:
        yield http


def stored(settings: Settings, prefix: str) -> list[str]:
    return LocalStorage(settings.storage_dir).list(prefix)


def upload(api: httpx.Client, headers: dict[str, str], data: bytes) -> str:
    response = api.post("/v1/uploads", content=data, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["key"]


def test_an_upload_lands_under_its_tenant(api, settings):
    key = upload(api, A, PNG)
    assert key.startswith("uploads/a/") and key.endswith(".png")
    assert stored(settings, "uploads/") == [key]
    assert LocalStorage(settings.storage_dir).get(key) == PNG


def test_another_tenants_upload_reads_as_a_missing_key(api, small_models_dir, tmp_path):
    image = upload(api, A, PNG)
    lora = upload(
        api,
        A,
        build_lora(
            small_models_dir / "z-image-turbo", "z-image-turbo", tmp_path / "z.safetensors"
        ).read_bytes(),
    )
    missing_image = f"uploads/a/{uuid.uuid4().hex}.png"
    missing_lora = f"uploads/a/{uuid.uuid4().hex}.safetensors"

    def edit(headers: dict[str, str], key: str) -> httpx.Response:
        return api.post("/v1/jobs", json=EDIT | {"images": [{"key": key}]}, headers=headers)

    def styled(headers: dict[str, str], key: str) -> httpx.Response:
        return api.post("/v1/jobs", json=SMALL | {"loras": [{"source": key}]}, headers=headers)

    for ask, key, missing in ((edit, image, missing_image), (styled, lora, missing_lora)):
        theirs, absent, own_absent = ask(B, key), ask(B, missing), ask(B, missing.replace("/a/", "/b/"))
        assert theirs.status_code == 422, theirs.text
        assert theirs.json() == absent.json() == own_absent.json()
        assert "upload it first" in theirs.text
        assert ask(A, key).status_code == 201


def test_another_tenants_output_reads_as_a_missing_key(api, settings, start_worker):
    start_worker(settings)
    job_id = api.post("/v1/jobs", json=SMALL, headers=A).json()["id"]
    deadline = time.monotonic() + 180
    while (job := api.get(f"/v1/jobs/{job_id}", headers=A).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["status"] == "succeeded", job["error"]
    output = job["outputs"][0]["key"]
    assert output.startswith(f"jobs/{job_id}/")

    def edit(headers: dict[str, str], key: str) -> httpx.Response:
        return api.post("/v1/jobs", json=EDIT | {"images": [{"key": key}]}, headers=headers)

    theirs = edit(B, output)
    no_such_job = edit(B, output.replace(job_id, uuid.uuid4().hex))
    no_such_output = edit(B, f"jobs/{job_id}/output-7.png")
    assert theirs.status_code == 422, theirs.text
    assert theirs.json() == no_such_job.json() == no_such_output.json()
    assert edit(A, output).status_code == 201


def test_a_request_refused_for_the_in_flight_limit_stores_and_fetches_nothing(api, settings, png_server):
    assert api.post("/v1/jobs", json=SMALL, headers=B).status_code == 201  # B's one job in flight
    refused = api.post("/v1/jobs", json=EDIT | {"images": [{"url": png_server.url}]}, headers=B)
    assert refused.status_code == 429, refused.text
    assert stored(settings, "inputs/") == []
    assert png_server.hits == 0


def test_a_repeated_or_conflicting_idempotency_key_stores_nothing_new(api, settings, png_server):
    body = EDIT | {"images": [{"url": png_server.url}]}
    headers = A | {"Idempotency-Key": "order-9"}
    first = api.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 201, first.text
    kept = stored(settings, "inputs/")
    assert kept == [f"inputs/a/{first.json()['id']}/images.0.png"]

    again = api.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    other = api.post("/v1/jobs", json=body | {"prompt": "add a scarf"}, headers=headers)
    assert other.status_code == 409, other.text
    assert stored(settings, "inputs/") == kept
    assert png_server.hits == 1


@pytest.fixture
def client(fleet_settings: Settings) -> Iterator[Client]:
    with Client(fleet_settings, url_policy=UrlPolicy(allow_cidrs=("127.0.0.2/32",))) as client:
        yield client


def test_a_batch_refused_for_one_request_keeps_no_inputs_of_the_others(client, fleet_settings, png_server):
    good = EDIT | {"images": [{"url": png_server.url}]}
    bad = EDIT | {
        "model": "qwen-image-edit-2509",
        "images": [{"url": png_server.url}, {"url": "http://127.0.0.1:9/x"}],
    }
    with pytest.raises(InvalidRequest) as raised:
        client.submit_many([good, bad])
    assert raised.value.fields == ["1.images.1"]
    assert png_server.hits == 2  # both requests' first images were fetched and stored, then deleted
    assert stored(fleet_settings, "inputs/") == []


def test_one_idempotency_key_twice_in_a_batch_keeps_the_first_jobs_inputs_only(
    client, fleet_settings, png_server
):
    request = EDIT | {"images": [{"url": png_server.url}]}
    first, second = client.submit_many([request, request], ["k", "k"], tenant="a")
    assert (first.id, first.created, second.created) == (second.id, True, False)
    assert stored(fleet_settings, "inputs/") == [f"inputs/a/{first.id}/images.0.png"]


def test_deleting_an_ended_job_deletes_the_copies_of_its_inputs_and_keeps_its_uploads(
    client, fleet_settings, png_server
):
    upload = client.upload(PNG, tenant="a")["key"]
    two = EDIT | {"model": "qwen-image-edit-2509", "images": [{"url": png_server.url}, {"key": upload}]}
    fetched = client.submit(two, tenant="a")
    other = client.submit(EDIT | {"images": [{"url": png_server.url}]}, tenant="a")
    client.cancel(fetched.id)  # no worker here: canceled while queued, an ended job
    client.delete(fetched.id)
    assert stored(fleet_settings, "inputs/") == [f"inputs/a/{other.id}/images.0.png"]
    assert stored(fleet_settings, "uploads/") == [upload]


def test_the_redis_sdk_uploads_under_its_tenant_and_refuses_unsafe_names(client, fleet_settings):
    key = client.upload(PNG, tenant="a")["key"]
    assert key.startswith("uploads/a/")
    assert client.upload(PNG)["key"].startswith("uploads/_/")  # no tenant
    with pytest.raises(InvalidRequest) as raised:
        client.submit(EDIT | {"images": [{"key": key}]}, tenant="b")
    assert raised.value.fields == ["images.0"]
    assert client.submit(EDIT | {"images": [{"key": key}]}, tenant="a").created
    for name in ("../a", "A", "a/b", "_x", "a" * 65):
        with pytest.raises(InvalidRequest) as raised:
            client.upload(PNG, tenant=name)
        assert raised.value.fields == ["tenant"]
        with pytest.raises(InvalidRequest):
            client.submit(SMALL, tenant=name)
    assert {key.split("/")[1] for key in stored(fleet_settings, "uploads/")} == {"a", "_"}

"""What one tenant can do to the HTTP API and everyone using it: a real uvicorn process, real
Redis. Bodies are refused before they are read, a slow upload check does not stall other
requests, webhook replays are rationed, and metrics are not on the API's port."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from localfleet.process import ApiProcess
from producer.client import Client
from routing.jobs import lifecycle
from routing.jobs.events import Webhook
from routing.settings import Settings
from tests.conftest import _free_port
from tests.webhook_receiver import Receiver
from worker.webhooks import Deliverer

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
JSON_CAP = 16 * 1024
UPLOAD_CAP = 64 * 1024 * 1024
A = {"Authorization": "Bearer key-a"}
SMALL = {"model": "z-image-turbo", "kind": "text-to-image", "prompt": "a fox", "width": 64, "height": 64}


@pytest.fixture
def settings(fleet_settings: Settings) -> Settings:
    return Settings.model_validate(
        fleet_settings.model_dump()
        | {
            "tenants": {"a": {"api_keys": ["key-a"], "webhook_secret": SECRET}},
            "max_json_body_bytes": JSON_CAP,
            "max_input_bytes": UPLOAD_CAP,
            "replay_per_job": 2,
            "replay_per_tenant": 3,
            "replay_window_s": 60,
            "metrics_port": _free_port(),
            "metrics_address": "127.0.0.1",
            "url_allow_cidrs": ["127.0.0.2/32"],
            "max_concurrent_uploads": 1,
        }
    )


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[ApiProcess]:
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as process:
        yield process


def raw_request(api: ApiProcess, head: str, body: bytes = b"") -> tuple[socket.socket, bytes]:
    """Send ``head`` (and ``body``) and return what the server answers within 5 s, without
    sending anything more: an answer proves the server did not wait for the rest of the body."""
    host, port = api.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)  # a timeout here fails the test: the server waited for the body
        if not chunk:
            break
        answer += chunk
    return sock, answer


def test_no_key_with_a_big_body_is_refused_before_the_body_is_read(api):
    sock, answer = raw_request(api, "POST /v1/jobs HTTP/1.1\nHost: x\nContent-Length: 500000000\n")
    sock.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer
    sock, answer = raw_request(
        api, "POST /v1/uploads HTTP/1.1\nHost: x\nAuthorization: Bearer wrong\nContent-Length: 500000\n"
    )
    sock.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer


@pytest.mark.parametrize(("path", "cap"), [("/v1/jobs", JSON_CAP), ("/v1/uploads", UPLOAD_CAP)])
def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_read(api, path, cap):
    head = f"POST {path} HTTP/1.1\nHost: x\nAuthorization: Bearer key-a\nContent-Length: {cap + 1}\n"
    sock, answer = raw_request(api, head)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer


def test_a_streamed_body_is_cut_off_at_the_cap(api):
    head = "POST /v1/jobs HTTP/1.1\nHost: x\nAuthorization: Bearer key-a\nTransfer-Encoding: chunked\n"
    chunk = b"x" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(JSON_CAP // 4096 + 1))
    sock, answer = raw_request(api, head, body)  # the body goes on: no last chunk is sent
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer


def test_a_body_at_the_cap_is_read(api):
    body = httpx.Request("POST", "/", json=SMALL).content
    at_cap = body + b" " * (JSON_CAP - len(body))
    with httpx.Client(base_url=api.url, trust_env=False, timeout=30) as http:
        response = http.post("/v1/jobs", content=at_cap, headers=A | {"Content-Type": "application/json"})
        over = http.post("/v1/jobs", content=at_cap + b" ", headers=A | {"Content-Type": "application/json"})
    assert response.status_code == 201, response.text
    assert over.status_code == 413


def lora_upload(size: int) -> bytes:
    """A safetensors file of ``size`` bytes: one F16 tensor of zeros."""
    tensor = (size - 200) // 2 * 2
    header = json.dumps({"w": {"dtype": "F16", "shape": [tensor // 2], "data_offsets": [0, tensor]}}).encode()
    header += b" " * (size - 8 - len(header) - tensor)
    return struct.pack("<Q", len(header)) + header + bytes(tensor)


def peak_rss_growth(pid: int, act: Callable[[], None]) -> int:
    """How far the peak resident memory of process ``pid`` rises above where it was while
    ``act`` runs (Linux: the peak is reset first)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def field(name: str) -> int:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(name))
        return int(line.split()[1]) * 1024

    before = field("VmRSS:")
    act()
    return field("VmHWM:") - before


def test_an_upload_is_streamed_to_the_store_so_memory_does_not_grow_with_its_size(api, settings):
    growth = {}
    with httpx.Client(base_url=api.url, trust_env=False, timeout=60) as http:
        http.post("/v1/uploads", content=lora_upload(1 << 20), headers=A)  # warm the route up
        for mib in (8, 56):
            data = lora_upload(mib * 1024 * 1024)
            answers: list[httpx.Response] = []

            def send(data: bytes = data, answers: list[httpx.Response] = answers) -> None:
                answers.append(http.post("/v1/uploads", content=data, headers=A))

            growth[mib] = peak_rss_growth(api.proc.pid, send)
            assert answers[0].status_code == 201, answers[0].text
            key = answers[0].json()["key"]
            assert (settings.storage_dir / key).read_bytes() == data
    # Held whole (twice, as it was), 56 MiB would raise the peak by over 100 MiB.
    assert growth[56] < growth[8] + 16 * 1024 * 1024, growth


def half_sent(api: ApiProcess, head: str, body: bytes) -> socket.socket:
    """A request of ``head`` whose ``body`` is sent up to its first 1,000 bytes: the rest later
    (``rest_sent``)."""
    host, port = api.url.removeprefix("http://").split(":")
    held = socket.create_connection((host, int(port)), timeout=10)
    held.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body[:1000])
    return held


def rest_sent(held: socket.socket, body: bytes) -> bytes:
    """The rest of a ``half_sent`` request's ``body`` sent, and the head of its answer."""
    held.sendall(body[1000:])
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += held.recv(65536)
    held.close()
    return answer


def test_a_tenant_has_only_so_many_uploads_at_once(api):
    data = lora_upload(1 << 20)
    held = half_sent(
        api,
        f"POST /v1/uploads HTTP/1.1\nHost: x\nAuthorization: Bearer key-a\nContent-Length: {len(data)}\n",
        data,
    )
    with httpx.Client(base_url=api.url, trust_env=False, timeout=30) as http:
        deadline = time.monotonic() + 10
        while (second := http.post("/v1/uploads", content=data, headers=A)).status_code != 429:
            assert second.status_code == 201 and time.monotonic() < deadline  # the first not in yet
        assert "FLEET_MAX_CONCURRENT_UPLOADS" in second.json()["detail"] and second.headers["Retry-After"]
        assert rest_sent(held, data).startswith(b"HTTP/1.1 201")
        assert http.post("/v1/uploads", content=data, headers=A).status_code == 201  # the slot is free


def test_an_openai_call_that_sends_a_file_holds_one_of_the_tenants_upload_slots(api):
    # A video made from an image file part, its body held half sent: the tenant's one upload slot
    # (FLEET_MAX_CONCURRENT_UPLOADS=1) is taken until the file is read, checked and stored.
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(png, "PNG")
    form = {
        "data": {"prompt": "waves", "size": "64x64"},
        "files": {"input_reference": ("a.png", png.getvalue())},
    }
    video = httpx.Request("POST", f"{api.url}/v1/videos", headers=A, **form)
    body = video.read()
    head = "".join(f"{name}: {value}\n" for name, value in video.headers.items() if name.lower() != "host")
    held = half_sent(api, f"POST /v1/videos HTTP/1.1\nHost: x\n{head}", body)
    with httpx.Client(base_url=api.url, trust_env=False, timeout=30) as http:
        deadline = time.monotonic() + 10
        while (second := http.post("/v1/videos", headers=A, **form)).status_code != 429:
            assert second.status_code == 200 and time.monotonic() < deadline, (
                second.text
            )  # the first not in yet
        assert (
            "FLEET_MAX_CONCURRENT_UPLOADS" in second.json()["error"]["message"]
            and second.headers["Retry-After"]
        )
        # An image edit's files too; a call that sends no file takes no upload slot.
        edit = {"data": {"prompt": "a hat", "size": "64x64"}, "files": {"image": ("a.png", png.getvalue())}}
        assert http.post("/v1/images/edits", headers=A, **edit).status_code == 429
        text_only = http.post("/v1/videos", json={"prompt": "waves", "size": "64x64"}, headers=A)
        assert text_only.status_code == 200, text_only.text
        assert rest_sent(held, body).startswith(b"HTTP/1.1 200")
        assert http.post("/v1/videos", headers=A, **form).status_code == 200  # the slot is free


def slow_to_check_video(frames: int = 60) -> bytes:
    """Motion JPEG of full-HD noise: each frame is slow to decode, yet the file is quick to make
    (one frame encoded, its packet written ``frames`` times)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as out:
        stream = out.add_stream("mjpeg", rate=24)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuvj420p"
        noise = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(noise, format="rgb24").reformat(format="yuvj420p")
        frame.pts, frame.time_base = 0, Fraction(1, 24)
        [packet] = stream.encode(frame)
        for i in range(frames):
            copy = av.Packet(bytes(packet))
            copy.stream, copy.time_base, copy.pts, copy.dts = stream, Fraction(1, 24), i, i
            out.mux(copy)
    return buffer.getvalue()


def test_other_requests_are_answered_while_an_upload_is_checked(settings: Settings, tmp_path: Path):
    # Seconds of decoding (400 full-HD frames), so that a check run on the event loop would hold
    # a /healthz far past the 1 s it is given, on a fast machine too.
    data = slow_to_check_video(frames=400)
    big = settings.model_copy(update={"max_input_bytes": 2 * len(data), "metrics_port": _free_port()})
    with ApiProcess(big, tmp_path / "api-big.log").wait_ready(60) as api:
        _answered_while_checked(api, data)


def _answered_while_checked(api: ApiProcess, data: bytes) -> None:
    done = threading.Event()
    outcome: list[int] = []

    def upload() -> None:
        with httpx.Client(base_url=api.url, trust_env=False, timeout=120) as http:
            outcome.append(http.post("/v1/uploads", content=data, headers=A).status_code)
        done.set()

    sent = time.monotonic()
    threading.Thread(target=upload, daemon=True).start()
    with httpx.Client(base_url=api.url, trust_env=False, timeout=10) as http:
        time.sleep(0.2)  # the upload is sent and being checked (about a second here)
        took: list[float] = []  # each /healthz asked before the upload's answer came
        while not done.is_set():
            started = time.monotonic()
            assert http.get("/healthz").status_code == 200
            took.append(time.monotonic() - started)
            time.sleep(0.05)
    upload_s = time.monotonic() - sent
    assert outcome == [201]
    # Answered while the check ran, several times: a check that held the event loop would
    # have let one /healthz through, after it, taking about the upload's whole time.
    assert len(took) >= 3
    assert max(took) < upload_s / 2, f"/healthz took {max(took):.1f} s of the upload's {upload_s:.1f} s"


def test_replays_are_rationed_per_job_and_per_tenant(api, settings):
    receiver = Receiver(SECRET)
    try:
        with Client(settings) as client, httpx.Client(base_url=api.url, trust_env=False, timeout=30) as http:
            events = []
            for _ in range(2):
                job = client.submit(SMALL, webhook=Webhook(receiver.url("/hook"), ("started",)), tenant="a")
                client.store.move(job.id, lifecycle.claim(client.store.get(job.id), "", time.time()))
                event = next(e for e in client.store.events(job.id) if e["type"] == "job.started")
                Deliverer(settings, client.store.client).deliver(
                    job.id, event["event_id"], "job.started", event["at"], 1
                )
                events.append(f"/v1/jobs/{job.id}/webhooks/{event['event_id']}/replay")

            first_job = [http.post(events[0], headers=A) for _ in range(3)]
            assert [r.status_code for r in first_job] == [202, 202, 429]  # replay_per_job = 2
            assert 1 <= int(first_job[-1].headers["Retry-After"]) <= 60
            second_job = [http.post(events[1], headers=A) for _ in range(2)]
            assert [r.status_code for r in second_job] == [202, 429]  # replay_per_tenant = 3
            assert 1 <= int(second_job[-1].headers["Retry-After"]) <= 60
    finally:
        receiver.close()


def test_metrics_are_served_on_their_own_port_only(api, settings):
    with httpx.Client(trust_env=False, timeout=10) as http:
        assert http.get(f"{api.url}/metrics").status_code == 404
        metrics = http.get(f"http://127.0.0.1:{settings.metrics_port}/metrics")
    assert metrics.status_code == 200
    assert "fleet_queue_depth" in metrics.text and "fleet_api_requests_total" in metrics.text


@pytest.mark.parametrize("per_tenant", [True, False])
def test_the_per_tenant_series_are_served_unless_turned_off(settings, tmp_path, per_tenant):
    settings = settings.model_copy(update={"metrics_per_tenant": per_tenant, "metrics_port": _free_port()})
    with (
        ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as api,
        httpx.Client(trust_env=False, timeout=10) as http,
    ):
        job = http.post(f"{api.url}/v1/jobs", json=SMALL, headers=A).json()["id"]
        assert http.delete(f"{api.url}/v1/jobs/{job}", headers=A).json()["status"] == "canceled"
        metrics = http.get(f"http://127.0.0.1:{settings.metrics_port}/metrics").text

    # The canceled job is tenant a's: counted, and shown only while the series are on.
    assert "fleet_jobs_running" in metrics
    shown = 'fleet_tenant_jobs_finished_total{class="gpu16",model="z-image-turbo",status="canceled",tenant="a"} 1.0'
    assert (shown in metrics) is per_tenant and ("fleet_tenant_" in metrics) is per_tenant

"""What a request's downloads cost the API: real HTTP servers on a loopback address the tests'
policy allows, and a real API process. A LoRA or media URL is streamed to a temporary file (its
memory does not grow with its size); every fetch of a request ends by one deadline; a tenant has
only so many submits downloading at once, and health checks never wait behind them."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from localfleet.process import ApiProcess
from producer.inputs import InputLimits, resolve_inputs, resolve_loras
from producer.tenant_keys import KeyScope
from routing.errors import InvalidRequest
from routing.io.net import UrlPolicy
from routing.io.storage import LocalStorage
from routing.schemas import parse_request
from routing.settings import Settings
from tests.integration.test_url_fetch import Server

pytestmark = pytest.mark.integration

POLICY = UrlPolicy(allow_cidrs=("127.0.0.2/32",))
TENANT = KeyScope("acme", lambda _: None)


def lora_file(rank: int, columns: int) -> tuple[bytes, int]:
    """A z-image-turbo LoRA's header, and the length of the zero body that follows it (F16)."""
    a = rank * columns * 2
    header = {
        "layers.0.attention.to_q.lora_A.weight": {"dtype": "F16", "shape": [rank, columns], "data_offsets": [0, a]},
        "layers.0.attention.to_q.lora_B.weight": {"dtype": "F16", "shape": [1, rank], "data_offsets": [a, a + 2 * rank]},
    }  # fmt: skip
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text, a + 2 * rank


def streamed(head: bytes, zeros: int) -> object:
    """A 200 whose body is ``head`` and then ``zeros`` zero bytes, sent in 64 KiB writes."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(head) + zeros))
        h.end_headers()
        h.wfile.write(head)
        chunk, left = bytes(65536), zeros
        while left:
            h.wfile.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))

    return route


@pytest.fixture
def server() -> Iterator[Server]:
    server = Server("127.0.0.2")
    yield server
    server.close()


def test_a_lora_url_is_streamed_to_disk_so_memory_does_not_grow_with_its_size(
    server: Server, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "objects")
    limits = InputLimits(lora_max_bytes=256 * 1024 * 1024, lora_max_rank=64)
    peaks = {}
    for mib in (8, 96):
        head, zeros = lora_file(4, mib * 1024 * 1024 // 8)
        server.routes[f"/{mib}.safetensors"] = streamed(head, zeros)
        request = parse_request(
            {
                "model": "z-image-turbo",
                "prompt": "a fox",
                "loras": [{"source": server.url(f"/{mib}.safetensors")}],
            }
        )
        tracemalloc.start()
        try:
            resolved = resolve_loras(request, storage, POLICY, limits, TENANT)
            peaks[mib] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        stored = storage.root / resolved.loras[0].source
        assert stored.stat().st_size == len(head) + zeros
    # Read whole, the 96 MiB LoRA would cost at least 96 MiB (twice that when copied); streamed,
    # both cost the same few chunks.
    assert peaks[96] < 4 * 1024 * 1024, peaks
    assert peaks[96] < peaks[8] + 1024 * 1024, peaks


def dripping(release: threading.Event, every_s: float = 1.0) -> object:
    """A 200 that promises 1 MB and sends a byte every ``every_s`` until released."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        h.wfile.flush()
        while not release.wait(every_s):
            h.wfile.write(b"x")
            h.wfile.flush()

    return route


def test_every_fetch_of_a_request_ends_by_one_deadline(server: Server, tmp_path: Path) -> None:
    # Three image URLs that drip a byte every 0.2 s: one deadline for all three, not one each.
    server.routes["/slow.png"] = dripping(server.release, 0.2)
    request = parse_request(
        {"model": "qwen-image-edit-2509", "prompt": "a fox", "images": [{"url": server.url("/slow.png")}] * 3}
    )
    storage = LocalStorage(tmp_path / "objects")
    started = time.monotonic()
    with pytest.raises(InvalidRequest) as raised:
        resolve_inputs(request, "0" * 32, storage, POLICY, InputLimits(fetch_timeout_s=1.5), TENANT)
    took_s = time.monotonic() - started
    assert [e.field for e in raised.value.errors] == ["images.0", "images.1", "images.2"]
    assert all("timed out" in e.message for e in raised.value.errors), raised.value.errors
    assert 1.4 < took_s < 2.5, took_s
    assert storage.list() == []


SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
# Long enough that all 45 submits are in (on a loaded machine too) before a slot is given back.
DEADLINE_S = 6
FETCHING = 2


@pytest.fixture
def api(fleet_settings: Settings, tmp_path: Path) -> Iterator[ApiProcess]:
    settings = Settings.model_validate(
        fleet_settings.model_dump()
        | {
            "tenants": {
                "a": {"api_keys": ["key-a"], "webhook_secret": SECRET},
                "b": {"api_keys": ["key-b"], "webhook_secret": SECRET},
            },
            "url_allow_cidrs": ["127.0.0.2/32"],
            "fetch_timeout_s": DEADLINE_S,
            "max_fetching_submits": FETCHING,
        }
    )
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as process:
        yield process


def test_slow_lora_urls_are_held_to_the_deadline_and_health_checks_answer_meanwhile(
    api: ApiProcess, server: Server
) -> None:
    # 45 submits of one tenant whose LoRA URL sends a byte a second took every thread of the API.
    server.routes["/drip.safetensors"] = dripping(server.release)
    body = {
        "model": "z-image-turbo",
        "kind": "text-to-image",
        "prompt": "a fox",
        "loras": [{"source": server.url("/drip.safetensors")}],
    }

    together = threading.Barrier(45)

    def submit(_: int) -> tuple[int, float, dict]:
        together.wait(10)
        started = time.monotonic()
        answer = httpx.post(f"{api.url}/v1/jobs", json=body, headers=A, timeout=DEADLINE_S + 20)
        return answer.status_code, time.monotonic() - started, answer.json()

    started = time.monotonic()
    with ThreadPoolExecutor(45) as pool, httpx.Client(base_url=api.url, timeout=5) as probe:
        submits = [pool.submit(submit, i) for i in range(45)]
        # Probed once all but the downloading ones are answered (a 429 is quick; the downloads
        # take the deadline), while those hold their threads.
        while sum(f.done() for f in submits) < 45 - FETCHING and time.monotonic() < started + DEADLINE_S - 2:
            time.sleep(0.1)
        assert not all(f.done() for f in submits)
        for _ in range(3):
            assert probe.get("/healthz").status_code == 200
            assert probe.get("/v1/jobs", headers=B).status_code == 200
        # All answered before the downloads gave up: the held submits did not hold them up.
        assert not all(f.done() for f in submits)
        results = [f.result() for f in submits]
    held = [r for r in results if r[0] == 422]
    refused = [r for r in results if r[0] == 429]
    assert len(held) == FETCHING and len(refused) == 45 - FETCHING, [r[:2] for r in results]
    for _status, took_s, answer in held:
        assert DEADLINE_S - 0.5 < took_s < DEADLINE_S + 4  # not two deadlines, nor 300 s
        [error] = answer["errors"]
        assert error["field"] == "loras.0.source" and "timed out" in error["message"]
    for _status, took_s, answer in refused:
        assert took_s < DEADLINE_S and "FLEET_MAX_FETCHING_SUBMITS" in answer["detail"]
    # Held submits gave their slots back: the tenant downloads again.
    server.routes["/missing.safetensors"] = lambda h: h.send_error(404)
    body["loras"] = [{"source": server.url("/missing.safetensors")}]
    together = threading.Barrier(1)
    for _ in range(FETCHING + 1):
        assert submit(0)[0] == 422


@pytest.mark.parametrize("second_rank", [40, 0], ids=["ranks-over-the-slot", "second-refused"])
def test_nothing_is_stored_for_a_refused_lora_request_and_a_stored_lora_is_the_tenants(
    server: Server, tmp_path: Path, second_rank: int
) -> None:
    storage = LocalStorage(tmp_path / "objects")
    head, zeros = lora_file(40, 64)
    server.routes["/first.safetensors"] = streamed(head, zeros)
    # The second: a LoRA of rank 40 too (the ranks add up past the slot's 64), or a file that
    # is no LoRA at all (the first alone would have passed).
    second_head, second_zeros = lora_file(40, 64) if second_rank else (b"not a lora at all", 0)
    storage.put(
        "uploads/acme/second.safetensors", second_head + bytes(second_zeros), "application/octet-stream"
    )
    loras = [{"source": server.url("/first.safetensors")}, {"source": "uploads/acme/second.safetensors"}]
    request = parse_request({"model": "z-image-turbo", "prompt": "a fox", "loras": loras})
    limits = InputLimits(lora_max_rank=64)
    with pytest.raises(InvalidRequest) as raised:
        resolve_loras(request, storage, POLICY, limits, TENANT)
    assert [e.field for e in raised.value.errors] == ["loras" if second_rank else "loras.1.source"]
    assert storage.list("loras/") == []

    # Accepted, the LoRA is stored under its tenant's folder, by its content's digest.
    alone = parse_request({"model": "z-image-turbo", "prompt": "a fox", "loras": loras[:1]})
    [stored] = resolve_loras(alone, storage, POLICY, limits, TENANT).loras
    digest = hashlib.sha256(head + bytes(zeros)).hexdigest()
    assert stored.source == f"loras/acme/{digest}.safetensors"
    assert storage.list("loras/") == [stored.source]

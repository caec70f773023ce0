"""What a request's downloads cost the API: real HTTP servers on a loopback address the tests'
policy allows. A LoRA or media URL is streamed to a temporary file (its memory does not grow with
its size)."""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from producer.inputs import InputLimits, resolve_loras
from producer.tenant_keys import KeyScope
from routing.io.net import UrlPolicy
from routing.io.storage import LocalStorage
from routing.schemas import parse_request
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

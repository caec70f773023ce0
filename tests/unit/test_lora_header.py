"""The safetensors header of an uploaded or fetched LoRA: its length and its tensor count are
capped before it is parsed, so a header bomb costs the API no more memory than a real LoRA."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from routing.io.loras import LoraError, read_header


def _safetensors(header: dict, body: bytes = b"") -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + body


def _tensors(count: int) -> dict:
    return {
        f"t{i}.lora_A.weight": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(count)
    }


def test_a_header_at_the_byte_cap_is_read_and_one_byte_more_is_refused() -> None:
    data = _safetensors({"__metadata__": {"note": "x" * 100}, **_tensors(3)}, b"abc")
    size = struct.unpack("<Q", data[:8])[0]
    assert len(read_header(data, max_header_bytes=size)) == 4
    with pytest.raises(LoraError, match=f"header is {size} bytes.*at most {size - 1}"):
        read_header(data, max_header_bytes=size - 1)


def test_a_header_at_the_tensor_cap_is_read_and_one_tensor_more_is_refused() -> None:
    # __metadata__ is not a tensor: it does not count.
    data = _safetensors({"__metadata__": {}, **_tensors(5)}, b"12345")
    assert len(read_header(data, max_tensors=5)) == 6
    with pytest.raises(LoraError, match="more than 4 tensors"):
        read_header(data, max_tensors=4)


def test_a_header_is_read_from_a_file_without_reading_the_body(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    path.write_bytes(_safetensors(_tensors(2), b"xy"))
    with path.open("rb") as file:
        assert set(read_header(file)) == {"t0.lora_A.weight", "t1.lora_A.weight"}


@pytest.mark.parametrize(
    "header",
    [
        b'{"a":{},}',
        b'{"a" {}}',
        b'{"a":{}} trailing',
        b"{" + b'"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["trailing-comma", "no-colon", "trailing-data", "deep-nesting"],
)
def test_a_malformed_header_is_refused_as_unreadable(header: bytes) -> None:
    with pytest.raises(LoraError, match="unreadable header"):
        read_header(struct.pack("<Q", len(header)) + header)


_MEASURE = """
import json, struct, sys, tracemalloc
from routing.io.loras import LoraError, read_header
size_mib, max_header_bytes = int(sys.argv[1]), int(sys.argv[2])
entries = b",".join(b'"k%d":{}' % i for i in range(size_mib * 1024 * 1024 // 10))
header = b"{" + entries + b"}"
path = sys.argv[3]
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header)
size = len(header)
del header
del entries
tracemalloc.start()
try:
    with open(path, "rb") as f:
        read_header(f, max_header_bytes=max_header_bytes)
    outcome = "accepted"
except LoraError as exc:
    outcome = str(exc)
print(json.dumps({"outcome": outcome, "peak": tracemalloc.get_traced_memory()[1], "size": size}))
"""


@pytest.mark.parametrize("max_header_bytes", [64 * 1024 * 1024, 1024 * 1024], ids=["count-cap", "byte-cap"])
def test_a_header_bomb_is_refused_before_it_is_parsed_with_memory_bounded(
    tmp_path: Path, max_header_bytes: int
) -> None:
    # 20 MiB of {"k0":{},"k1":{},...} and more: json.loads of it takes about 430 MiB. Refused either by its
    # length (byte cap) or at the 10,001st entry (a byte cap that lets it through).
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, "20", str(max_header_bytes), str(tmp_path / "bomb.safetensors")],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    measured = json.loads(result.stdout)
    assert "header is" in measured["outcome"] or "more than 10000 tensors" in measured["outcome"]
    # Past the byte cap nothing of the header is read; under it, its bytes and its text and
    # 10,000 small entries are what is held, not 20 times its size in parsed objects.
    bound = 1024 * 1024 if max_header_bytes < measured["size"] else 2.5 * measured["size"]
    assert measured["peak"] < bound, measured

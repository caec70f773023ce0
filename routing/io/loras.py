"""LoRA files checked before a job is queued: safetensors only, within the size cap, made for the
model the request names, and within the LoRA slot's rank.

Only the header is read (8 bytes of length, then JSON naming every tensor with its dtype, shape
and offsets): nothing is deserialised. A pickle checkpoint (``.bin``, ``.pt``, ``.ckpt``) is
refused, because loading one runs whatever code it holds.

A LoRA's header is kilobytes, but its length is the sender's to choose, and parsed JSON takes
many times its size in memory (``{"k0":{},"k1":{},...}``: about 20 bytes of objects per byte).
So the declared length is checked against ``max_header_bytes`` before anything past it is read,
and the header is parsed one tensor entry at a time, refused at entry ``max_tensors + 1``.
"""

from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import dataclass
from json.decoder import scanstring
from typing import BinaryIO

from routing.catalog import CATALOG, ModelSpec

# Prefixes LoRA files put before the transformer's module paths, and the suffixes after them.
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_SUFFIX = re.compile(
    r"\.(lora_[AB](\.default)?\.(weight|bias)|lora_(down|up)\.weight|alpha|diff|diff_b|dora_scale)$"
)
_DOWN = re.compile(r"\.(lora_A(\.default)?|lora_down)\.weight$")
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


# Safetensors itself refuses headers over 100 MB; a LoRA's, with its metadata, is well under 1 MiB
# (a rank-64 LoRA of a 60-block transformer names about 3,000 tensors).
DEFAULT_MAX_HEADER_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TENSORS = 10_000
_SPACE = re.compile(r"[ \t\n\r]*")


class LoraError(ValueError):
    """The file cannot be used as a LoRA for this model; the message says why."""


@dataclass(frozen=True)
class LoraInfo:
    modules: frozenset[str]  # the module paths it targets
    rank: int  # its largest rank


def check_lora(
    data: bytes | BinaryIO,
    spec: ModelSpec,
    max_bytes: int,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> LoraInfo:
    """Check ``data`` (bytes, or a seekable binary file) is a safetensors LoRA for ``spec``;
    raises ``LoraError`` saying why not."""
    if _length(data) > max_bytes:
        raise LoraError(f"larger than {max_bytes} bytes")
    header = read_header(data, max_header_bytes=max_header_bytes, max_tensors=max_tensors)
    modules: set[str] = set()
    rank = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if _DOWN.search(name):
            rank = max(rank, int(entry["shape"][0]))
        modules.add(module_path(name))
    if not modules or rank == 0:
        raise LoraError("holds no LoRA weights (no lora_A / lora_down tensors)")
    if spec.lora_modules is None:
        raise LoraError(f"{spec.key} takes no LoRAs")
    if not _all_match(modules, spec.lora_modules):
        raise LoraError(_not_for(spec, modules))
    return LoraInfo(frozenset(modules), rank)


def read_header(
    data: bytes | BinaryIO,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> dict[str, dict]:
    """The safetensors header of ``data`` (bytes, or a seekable binary file, read from its
    start), its offsets checked against the file's length. Only the header is read."""
    file = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    length = _length(file)
    file.seek(0)
    start = file.read(9)
    if start[:2] == b"PK" or start[:1] == b"\x80":
        raise LoraError(
            "a pickle checkpoint (.bin/.pt), not safetensors: loading one can run code; "
            "convert it to .safetensors"
        )
    if length < 10:
        raise LoraError("not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", start[:8])
    if size > length - 8 or start[8:9] != b"{":
        raise LoraError("not a safetensors file (no JSON header)")
    if size > max_header_bytes:
        raise LoraError(
            f"the safetensors header is {size} bytes; a LoRA's is kilobytes, and at most "
            f"{max_header_bytes} are read"
        )
    file.seek(8)
    try:
        header = _parse_entries(file.read(size).decode("utf-8"), max_tensors)
    except LoraError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LoraError("not a safetensors file (unreadable header)") from None
    body = length - 8 - size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            shape = entry["shape"]
            itemsize = _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise LoraError(f"tensor {name!r}: malformed header entry") from None
        count = 1
        for dim in shape:
            count *= int(dim)
        if not 0 <= start <= end <= body or end - start != count * itemsize:
            raise LoraError(f"tensor {name!r}: offsets outside the file or not its shape's size")
    return header


def _length(data: bytes | BinaryIO) -> int:
    if isinstance(data, bytes | bytearray):
        return len(data)
    return data.seek(0, io.SEEK_END)


def _parse_entries(text: str, max_tensors: int) -> dict[str, dict]:
    """The header object, parsed one top-level entry at a time so that a header of many entries
    is refused at entry ``max_tensors + 1`` (``__metadata__`` aside), not after all are parsed."""
    decoder = json.JSONDecoder()
    header: dict[str, dict] = {}
    tensors = 0
    at = _SPACE.match(text, 1).end()  # past the "{" read_header saw
    if text[at : at + 1] == "}":
        at += 1
    else:
        while True:
            if text[at : at + 1] != '"':
                raise ValueError("expected a name")
            name, at = scanstring(text, at + 1)
            at = _SPACE.match(text, at).end()
            if text[at : at + 1] != ":":
                raise ValueError("expected ':'")
            if name != "__metadata__" and name not in header:
                tensors += 1
                if tensors > max_tensors:
                    raise LoraError(f"the header names more than {max_tensors} tensors")
            header[name], at = decoder.raw_decode(text, _SPACE.match(text, at + 1).end())
            at = _SPACE.match(text, at).end()
            if text[at : at + 1] == ",":
                at = _SPACE.match(text, at + 1).end()
                continue
            if text[at : at + 1] != "}":
                raise ValueError("expected ',' or '}'")
            at += 1
            break
    if text[at:].strip(" \t\n\r"):
        raise ValueError("data after the header object")
    return header


def module_path(tensor_name: str) -> str:
    """``transformer.layers.0.attention.to_q.lora_A.weight`` -> ``layers.0.attention.to_q``."""
    name = _SUFFIX.sub("", tensor_name)
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    return name


def _all_match(modules: set[str], pattern: str) -> bool:
    regex = re.compile(pattern)
    return all(regex.fullmatch(module) for module in modules)


def _not_for(spec: ModelSpec, modules: set[str]) -> str:
    fits = sorted(
        key
        for key, other in CATALOG.items()
        if other.lora_modules and _all_match(modules, other.lora_modules)
    )
    regex = re.compile(spec.lora_modules or "")
    example = sorted(m for m in modules if not regex.fullmatch(m))[0]
    if fits:
        return f"made for {', '.join(fits)}, not {spec.key}: it targets {example}"
    return f"not a LoRA for {spec.key} nor any model served here: it targets {example}"

"""LoRA files checked before a job is queued: safetensors only, within the size cap, made for the
model the request names, and within the LoRA slot's rank.

Only the header is read (8 bytes of length, then JSON naming every tensor with its dtype, shape
and offsets): nothing is deserialised. A pickle checkpoint (``.bin``, ``.pt``, ``.ckpt``) is
refused, because loading one runs whatever code it holds.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

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


class LoraError(ValueError):
    """The file cannot be used as a LoRA for this model; the message says why."""


@dataclass(frozen=True)
class LoraInfo:
    modules: frozenset[str]  # the module paths it targets
    rank: int  # its largest rank


def check_lora(data: bytes, spec: ModelSpec, max_bytes: int) -> LoraInfo:
    """Check ``data`` is a safetensors LoRA for ``spec``; raises ``LoraError`` saying why not."""
    if len(data) > max_bytes:
        raise LoraError(f"larger than {max_bytes} bytes")
    header = read_header(data)
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


def read_header(data: bytes) -> dict[str, dict]:
    """The safetensors header of ``data``, its offsets checked against the file's length."""
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise LoraError(
            "a pickle checkpoint (.bin/.pt), not safetensors: loading one can run code; "
            "convert it to .safetensors"
        )
    if len(data) < 10:
        raise LoraError("not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8 or data[8:9] != b"{":
        raise LoraError("not a safetensors file (no JSON header)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, ValueError):
        raise LoraError("not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise LoraError("not a safetensors file (header is not an object)")
    body = len(data) - 8 - size
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

"""LoRAs on the worker: a local disk cache of the files, and the slot a request's LoRAs go into.

A request's LoRAs were checked and stored at submit under ``loras/<sha256>.safetensors``; the
worker reads them from the object store once and keeps them on local disk by content hash,
least recently used evicted first past ``lora_cache_bytes``.

The slot is one LoRA adapter ("request") of rank ``lora_max_rank`` on every linear layer of the
transformer the catalog lets LoRAs target, put there at load with all-zero weights (``B A x`` is
then exactly 0, so the output is the base model's, bit for bit) and before the transformer is
compiled. A job's LoRAs, up to three, are merged into that one adapter: their ranks stacked
(``sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2] [A_1; A_2]``, each scale folded into its B) and padded
with zeros to the slot's rank, then hotswapped in (diffusers ``load_lora_weights(hotswap=True)``):
the weights are copied into the slot's tensors, so a compiled transformer runs on without
compiling again. After the job the slot is zeroed: the next job sees exactly the base weights.

A variant's distillation LoRA is a second adapter, loaded once and kept: it is switched on
(``set_adapters``) for that variant's jobs only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routing.io.storage import Storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SLOT = "request"
_KEY = re.compile(r"^loras/([0-9a-f]{64})\.safetensors$")


class LoraCache:
    """LoRA files on local disk by content hash, least recently used evicted past ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    def path(self, key: str, storage: Storage) -> Path:
        """The local file of the store object ``key`` (``loras/<sha256>.safetensors``), read from
        the store only when the cache does not hold it."""
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a checked LoRA (loras/<sha256>.safetensors)")
        digest = match.group(1)
        path = self.directory / f"{digest}.safetensors"
        if path.exists():
            os.utime(path)  # most recently used
            self.hits += 1
            return path
        data = storage.get(key)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{key} does not hold the bytes its name says")
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(path)
        self.misses += 1
        self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        files = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.max_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)


def target_modules(transformer: torch.nn.Module, pattern: str) -> dict[str, torch.nn.Linear]:
    """The transformer's linear layers whose path matches the catalog's LoRA pattern."""
    import torch

    regex = re.compile(pattern)
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and regex.fullmatch(name)
    }


class LoraSlot:
    """The request LoRA slot of one pipeline (see the module docstring)."""

    def __init__(self, pipe: Any, pattern: str, rank: int):
        import torch

        self.pipe = pipe
        self.rank = rank
        self.modules = target_modules(pipe.transformer, pattern)
        if not self.modules:
            raise ValueError(f"no layer of {type(pipe.transformer).__name__} matches the LoRA pattern")
        self.variants: dict[str, float] = {}  # loaded variant adapters and their scales
        self.active: tuple[str, ...] = ()
        # Before the first adapter: pads every later one to ``rank`` and turns the scalings into
        # tensors, so neither a rank nor a scale is ever a constant a compiled graph depends on.
        pipe.enable_lora_hotswap(target_rank=rank)
        zeros = {}
        for name, module in self.modules.items():
            zeros[f"transformer.{name}.lora_A.weight"] = torch.zeros(rank, module.in_features)
            zeros[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank)
        pipe.load_lora_weights(zeros, adapter_name=SLOT)
        self.active = (SLOT,)
        self._measure()

    def _measure(self) -> None:
        # Memory the LoRA adapters take on the transformer (the slot and any variant), measured
        # when they change rather than on every read: the heartbeat reads it.
        self.nbytes = sum(
            p.numel() * p.element_size() for n, p in self.pipe.transformer.named_parameters() if "lora_" in n
        )

    def add_variant(self, name: str, path: str, scale: float) -> None:
        """Load a variant's LoRA as an adapter of its own, kept loaded (switched off until used)."""
        self.pipe.load_lora_weights(path, adapter_name=name)
        self.variants[name] = scale
        self.use(None)
        self._measure()

    def use(self, variant: str | None) -> None:
        """Switch the variant's adapter on beside the slot (or every variant off)."""
        wanted = (SLOT, variant) if variant else (SLOT,)
        if wanted != self.active:
            self.pipe.set_adapters(list(wanted), [1.0, self.variants[variant]] if variant else [1.0])
            self.active = wanted

    def apply(self, loras: list[tuple[str, float]]) -> None:
        """Hotswap the merged ``(file, scale)`` LoRAs into the slot."""
        self.pipe.load_lora_weights(self.merged(loras), adapter_name=SLOT, hotswap=True)

    def merged(self, loras: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
        import torch

        stacked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        offset = 0
        for path, scale in loras:
            state = self.pipe.lora_state_dict(path)
            state = state[0] if isinstance(state, tuple) else state
            rank = 0
            for key, down in state.items():
                if ".lora_A." not in key:
                    continue
                module = key.removeprefix("transformer.").split(".lora_A.")[0]
                if module not in self.modules:
                    raise ValueError(f"the LoRA {Path(path).name} targets {module}, which takes no LoRA here")
                up = state[key.replace(".lora_A.", ".lora_B.")]
                alpha = state.get(f"{key.split('.lora_A.')[0]}.alpha")
                factor = scale * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
                downs, ups = stacked.setdefault(module, ([], []))
                width = down.shape[0]
                rank = max(rank, width)
                layer = self.modules[module]
                # Rows of this LoRA start at ``offset`` in every module, after the ones before it.
                a = torch.zeros(self.rank, layer.in_features)
                b = torch.zeros(layer.out_features, self.rank)
                if offset + width > self.rank:
                    raise ValueError(f"the LoRAs' ranks add up to more than the slot's {self.rank}")
                a[offset : offset + width] = down.float()
                b[:, offset : offset + width] = up.float() * factor
                downs.append(a)
                ups.append(b)
            offset += rank
        merged: dict[str, torch.Tensor] = {}
        for module, (downs, ups) in stacked.items():
            merged[f"transformer.{module}.lora_A.weight"] = sum(downs)
            merged[f"transformer.{module}.lora_B.weight"] = sum(ups)
        return merged

    def clear(self) -> None:
        """Zero the slot: the transformer computes exactly the base model again."""
        import torch

        with torch.no_grad():
            for name, param in self.pipe.transformer.named_parameters():
                if f".{SLOT}." in name:
                    param.zero_()

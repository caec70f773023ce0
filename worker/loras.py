"""LoRAs on the worker: a local disk cache of the files, and the slot a request's LoRAs go into.

A request's LoRAs were checked and stored at submit under ``loras/<tenant>/<sha256>.safetensors``; the
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

The slot is switched off (peft's adapters disabled) for jobs without LoRAs: they compute the base
layers alone, and pay nothing for the slot (``switch``).

A variant's distillation LoRA is read and converted once and kept on the device; a variant job
copies it into the slot with the request's LoRAs (its rows first). A second adapter switched on
with ``set_adapters`` was tried and refused: on a compiled transformer it changed the base
output and recompiled on every switch until dynamo's limit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from routing.io.storage import Storage

log = logging.getLogger(__name__)

SLOT = "request"
# loras/<tenant>/<sha256>.safetensors (without a tenant's folder: stored before LoRAs had owners).
_KEY = re.compile(r"^loras/(?:[a-z0-9_][a-z0-9_-]{0,63}/)?([0-9a-f]{64})\.safetensors$")


class LoraCache:
    """LoRA files on local disk by content hash, least recently used evicted past ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    def path(self, key: str, storage: Storage) -> Path:
        """The local file of the store object ``key`` (``loras/<tenant>/<sha256>.safetensors``), read from
        the store only when the cache does not hold it."""
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a checked LoRA (loras/<tenant>/<sha256>.safetensors)")
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

    def __init__(self, pipe: Any, pattern: str, rank: int, component: str = "transformer"):
        import torch

        self.pipe = pipe
        self.rank = rank
        # The pipeline's transformer the slot is on: ``transformer``, or ``transformer_2`` (a
        # two-expert model's low-noise expert, loaded through the same pipeline call).
        self.component = component
        self.transformer = getattr(pipe, component)
        self._load = {"load_into_transformer_2": True} if component == "transformer_2" else {}
        self.modules = target_modules(self.transformer, pattern)
        if not self.modules:
            raise ValueError(f"no layer of {type(self.transformer).__name__} matches the LoRA pattern")
        # Loaded variants: their LoRA's converted tensors, on the device, and scale.
        self.variants: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
        # Before the first adapter: pads every later one to ``rank`` and turns the scalings into
        # tensors, so neither a rank nor a scale is ever a constant a compiled graph depends on.
        # On the transformer itself: the pipeline's call would reach a second transformer that
        # already has its slot, and refuse.
        self.transformer.enable_lora_hotswap(target_rank=rank)
        zeros = {}
        for name, module in self.modules.items():
            zeros[f"transformer.{name}.lora_A.weight"] = torch.zeros(rank, module.in_features)
            zeros[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank)
        pipe.load_lora_weights(zeros, adapter_name=SLOT, **self._load)
        # The LoRA-wrapped layers, whose adapters ``switch`` turns off and on.
        self.layers = [m for m in self.transformer.modules() if hasattr(m, "_disable_adapters")]
        self._measure()

    def switch(self, on: bool) -> None:
        """Off: every wrapped layer computes its base weights alone, as before the slot was put
        there (peft's disabled adapters); on: base plus the slot. Set on the layers directly:
        peft's own ``enable_adapters`` also marks the slot's weights trainable, which a compiled
        graph would be guarded on and recompile for."""
        for layer in self.layers:
            layer._disable_adapters = not on

    def _measure(self) -> None:
        # Memory the LoRA adapters take on the transformer (the slot and any variant), measured
        # when they change rather than on every read: the heartbeat reads it.
        slot = sum(
            p.numel() * p.element_size() for n, p in self.transformer.named_parameters() if "lora_" in n
        )
        variants = sum(
            t.numel() * t.element_size() for state, _ in self.variants.values() for t in state.values()
        )
        self.nbytes = slot + variants

    def add_variant(self, name: str, path: str, scale: float) -> None:
        """Read and convert a variant's LoRA once; it stays on the device for its jobs."""
        device = next(self.transformer.parameters()).device
        state = self._state(path)
        self.variants[name] = ({key: value.to(device) for key, value in state.items()}, scale)
        self._measure()

    def apply(self, loras: list[tuple[str | dict[str, torch.Tensor], float]]) -> None:
        """Hotswap the merged ``(file or loaded LoRA, scale)`` list into the slot."""
        self.pipe.load_lora_weights(self.merged(loras), adapter_name=SLOT, hotswap=True, **self._load)

    def _state(self, path: str) -> dict[str, torch.Tensor]:
        state = self.pipe.lora_state_dict(path)
        return state[0] if isinstance(state, tuple) else state

    def merged(self, loras: list[tuple[str | dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
        import torch

        stacked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        offset = 0
        for source, scale in loras:
            state = source if isinstance(source, dict) else self._state(source)
            name = "a variant's LoRA" if isinstance(source, dict) else f"the LoRA {Path(source).name}"
            rank = 0
            for key, down in state.items():
                if ".lora_A." not in key:
                    continue
                module = key.removeprefix("transformer.").split(".lora_A.")[0]
                if module not in self.modules:
                    raise ValueError(f"{name} targets {module}, which takes no LoRA here")
                up = state[key.replace(".lora_A.", ".lora_B.")]
                alpha = state.get(f"{key.split('.lora_A.')[0]}.alpha")
                factor = scale * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
                downs, ups = stacked.setdefault(module, ([], []))
                width = down.shape[0]
                rank = max(rank, width)
                layer = self.modules[module]
                # Rows of this LoRA start at ``offset`` in every module, after the ones before it.
                a = torch.zeros(self.rank, layer.in_features, device=down.device)
                b = torch.zeros(layer.out_features, self.rank, device=down.device)
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
            for name, param in self.transformer.named_parameters():
                if f".{SLOT}." in name:
                    param.zero_()

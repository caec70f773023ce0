"""Builds every served model's components at full size on the meta device and counts their
weights: what ``routing/memory/weights.json`` holds, so routing never builds a model to know its
memory. Here, not in routing: it needs the worker's libraries, which the API does not install.

    python -m worker.memory_build            # prints the counts
    python -m worker.memory_build --write    # and rewrites routing/memory/weights.json

Needs torch, diffusers, transformers, accelerate and, for S2V's transformer, the official Wan2.2
code (``wan22``): a worker's install, not the API's. Parameters are made on the meta device (no
memory, no download); buffers (RoPE tables and the like) are real and counted at their dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent / "routing" / "memory"
CONFIGS = HERE / "configs.json"
WEIGHTS = HERE / "weights.json"
# Weights are served in bfloat16; FP8 (torchao) stores a linear layer's weight in one byte.
BF16_BYTES = 2


def load_configs() -> dict[str, dict[str, dict[str, Any]]]:
    """Each model's components, by name, as ``{"class": ..., "config": {...}}``."""
    data = json.loads(CONFIGS.read_text())
    shared = data["shared"]
    return {
        model: {
            name: shared[entry["same_as"]] if "same_as" in entry else entry for name, entry in parts.items()
        }
        for model, parts in data["models"].items()
    }


def _class(path: str) -> Any:
    if path.startswith("wan."):
        from worker.adapters.wan_s2v.official import import_wan_modules

        module = import_wan_modules()  # the official code, imported as the worker imports it
        name = path.removeprefix("wan.modules.s2v.").split(".")
        return getattr(module[name[0]], name[1])
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Weight initialisers as no-ops: on the meta device they compute nothing but still cost
    seconds of dispatch, and a count does not need them."""
    import torch

    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def build_on_meta(entry: dict[str, Any]) -> Any:
    """The component with its parameters on the meta device."""
    with _no_init():
        return _build(entry)


def _build(entry: dict[str, Any]) -> Any:
    from accelerate import init_empty_weights

    cls, config = _class(entry["class"]), dict(entry["config"])
    if entry["class"].startswith("transformers."):
        from transformers import AutoConfig

        with init_empty_weights():
            model = cls._from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        # As from_pretrained does once the weights are in (inside init_empty_weights it does not
        # tie): UMT5's encoder shares its embedding with ``shared``.
        model.tie_weights()
        return model
    with init_empty_weights():
        if entry["class"].startswith("diffusers."):
            return cls.from_config(config)
        return cls(**config)


def count(module: Any) -> dict[str, int]:
    """Parameters, and bytes in bfloat16 (buffers at their own dtype); the bytes in repeated
    blocks (``nn.ModuleList`` children) and the largest block (what block-level group offload
    moves at a time); the bytes of linear weights (what FP8 halves)."""
    import torch

    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    blocks = [
        block for child in module.modules() if isinstance(child, torch.nn.ModuleList) for block in child
    ]
    in_blocks = {id(p): p.numel() for block in blocks for p in block.parameters()}
    linear = {id(m.weight): m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)}
    return {
        "params": params,
        "bytes": params * BF16_BYTES + buffers,
        "block_bytes": sum(in_blocks.values()) * BF16_BYTES,
        "largest_block_bytes": max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
        * BF16_BYTES,
        "linear_weight_bytes": sum(linear.values()) * BF16_BYTES,
    }


def compute() -> dict[str, dict[str, dict[str, int]]]:
    cache: dict[str, dict[str, int]] = {}
    out: dict[str, dict[str, dict[str, int]]] = {}
    for model, parts in load_configs().items():
        out[model] = {}
        for name, entry in parts.items():
            key = json.dumps(entry, sort_keys=True)
            if key not in cache:
                cache[key] = count(build_on_meta(entry))
            out[model][name] = cache[key]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.memory_build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--write", action="store_true", help=f"rewrite {WEIGHTS.name}")
    args = parser.parse_args(argv)
    counts = compute()
    for model, parts in counts.items():
        for name, c in parts.items():
            print(f"{model:22} {name:14} {c['params'] / 1e9:7.3f}B params {c['bytes'] / 2**30:7.2f} GiB")
    if args.write:
        WEIGHTS.write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

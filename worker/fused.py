"""Fused QKV projections for the Wan, Qwen-Image and Z-Image transformers, with no second copy
of the weights.

diffusers' Wan attention computes query, key and value with one GEMM when its
``fused_projections`` is set: ``to_qkv`` in self-attention, ``to_kv`` (key and value of the text)
in cross-attention, ``to_added_kv`` for image-to-video's image tokens. Qwen-Image's and Z-Image's
processors in diffusers never read the flag; the fleet's (worker/fused_attention.py) do, and are
set in their place when fusing: ``to_qkv`` for the image stream (Z-Image's one stream),
``to_added_qkv`` for Qwen-Image's text stream. diffusers' ``fuse_projections`` makes the fused
layers from copies of ``to_q``, ``to_k`` and ``to_v``: both sets then live on the card. Here the
parts are made views of the fused weights instead (the same storage, rows after rows), so fusing
costs no memory.

The parts stay where they are because the LoRA slot wraps them (worker/loras.py): a job that runs
through the slot runs the parts, each with its LoRA, and a base job (the slot off) runs the fused
layers. The two states are two compiled graphs, both made by the warm-up, which runs each size
with the slot off and on. A checkpoint variant's weights are fused the same way when they are read
(worker/checkpoints.py), so they swap into both.

Views of one storage do not survive a move between devices (each tensor moves alone), so a model
whose transformer moves between host memory and the GPU (model offload, the two-expert models'
expert offload) is not fused, nor are FP8 linear layers (each layer quantises its own copy).
Fused and unfused outputs are not bit for bit the same: one GEMM of three times the width may
tile its sums otherwise. ``bench/gpu_speed.py`` measures the deviation (``fleet+fused-qkv``).
"""

from __future__ import annotations

from typing import Any

# The fused layers diffusers' Wan attention runs, and the layers each is made of, in order.
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_kv": ("add_k_proj", "add_v_proj"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}

# The attention classes whose processors run the fused layers when ``fused_projections`` is set
# (other diffusers attention classes have the method but their processors never read the flag).
_FUSABLE = frozenset(
    {
        "diffusers.models.transformers.transformer_wan.WanAttention",
        "diffusers.models.transformers.transformer_wan_animate.WanAttention",
    }
)


def fusable(transformer: Any) -> list[Any]:
    """The attention modules of ``transformer`` that can run fused projections: Wan's, and those
    whose processor the fleet has a fused one for (or already set)."""
    from worker.fused_attention import FUSED_PROCESSORS

    processors = (*FUSED_PROCESSORS, *FUSED_PROCESSORS.values())
    return [
        m
        for m in transformer.modules()
        if f"{type(m).__module__}.{type(m).__qualname__}" in _FUSABLE
        or type(getattr(m, "processor", None)) in processors
    ]


def fuse(transformer: Any) -> list[Any]:
    """Fuse every fusable attention of ``transformer`` (its parts made views of the fused
    weights; the fleet's processor set where diffusers' does not read the flag), left switched
    off; returns the fused modules ([] when it has none)."""
    from worker.fused_attention import FUSED_PROCESSORS

    modules = fusable(transformer)
    for module in modules:
        fused_processor = FUSED_PROCESSORS.get(type(module.processor))
        if fused_processor is not None:  # keeps what was set on it (an attention backend)
            processor = fused_processor()
            processor.__dict__.update(module.processor.__dict__)
            module.set_processor(processor)
        module.fuse_projections()
        for fused_name, parts in FUSED_PARTS.items():
            fused = getattr(module, fused_name, None)
            if fused is not None:
                tie(fused, [getattr(module, part) for part in parts])
        module.fused_projections = False
    return modules


def tie(fused: Any, parts: list[Any]) -> None:
    """Make each layer of ``parts`` hold its rows of ``fused``'s weight and bias (views)."""
    import torch

    rows = [part.weight.shape[0] for part in parts]  # split checks they sum to the fused layer's
    for name in ("weight", "bias"):
        whole = getattr(fused, name)
        if whole is None:
            continue
        for part, view in zip(parts, whole.detach().split(rows), strict=True):
            setattr(part, name, torch.nn.Parameter(view, requires_grad=getattr(part, name).requires_grad))


def switch(modules: list[Any], on: bool) -> None:
    """Run the fused layers (``on``) or the parts (for the LoRA slot) in ``modules``."""
    for module in modules:
        module.fused_projections = on


def fused_names(names: list[str]) -> dict[str, tuple[str, ...]]:
    """Of the parameter names ``names``, those of fused layers, each with its parts' names:
    ``blocks.0.attn1.to_qkv.weight`` is made of ``blocks.0.attn1.to_q.weight`` and the rest."""
    found: dict[str, tuple[str, ...]] = {}
    for name in names:
        prefix, _, rest = name.rpartition(".")  # rest: weight or bias
        owner, _, layer = prefix.rpartition(".")
        if layer in FUSED_PARTS:
            found[name] = tuple(f"{owner}.{part}.{rest}" for part in FUSED_PARTS[layer])
    return found


def fuse_tensors(tensors: dict[str, Any], fused: dict[str, tuple[str, ...]]) -> None:
    """Add each fused layer's tensor to ``tensors`` (parameter name to tensor), made of its parts'
    (``fused_names``), and make the parts views of it, as ``fuse`` does for a module."""
    import torch

    for name, parts in fused.items():
        whole = torch.cat([tensors[part] for part in parts])
        views = whole.split([tensors[part].shape[0] for part in parts])
        tensors.update(zip(parts, views, strict=True))
        tensors[name] = whole

"""A variant that is a whole distilled checkpoint of a model's transformer (FastWan2.2-TI2V-5B
of Wan2.2-TI2V-5B), not a LoRA.

Its weights are read once, on the first job that asks, and kept where the model's transformer
keeps its own (the GPU for a resident model, host memory for an offloaded one). For each of the
variant's jobs they are swapped into the transformer's parameters, and the model's own swapped
back after: the tensors change places (no copy), and the modules stay the very same objects, so
the LoRA slot, the attention backend and the compiled blocks (whose graphs take the parameters as
inputs) all serve the variant as they serve the model, and nothing compiles for it.

A transformer with fused QKV projections (worker/fused.py) has its parts as views of the fused
weights: the checkpoint's are read into the same layout, so both swap.

Only the transformer's base weights change places. The LoRA slot's own tensors stay, so a job may
name LoRAs with the variant. FP8 linear layers are another format than a checkpoint's bf16
weights: a worker running them refuses the variant, saying so, as does a group-offloaded
transformer (its hooks onload their own host copies of the weights). CUDA graphs (off for every model
until a GPU run measures them) record the weights' addresses: a swap would make them record again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from worker.fused import fuse_tensors, fused_names

if TYPE_CHECKING:
    import torch

# What peft inserts in the name of a layer it wraps: ``blocks.0.attn1.to_q.base_layer.weight`` is
# the checkpoint's ``blocks.0.attn1.to_q.weight``.
_PEFT_BASE = ".base_layer"


class CheckpointVariant:
    """A distilled transformer's weights, ready to swap into ``transformer`` for a job."""

    def __init__(self, transformer: torch.nn.Module, path: str):
        """Read the diffusers-layout checkpoint at ``path`` (its ``transformer/`` folder, or that
        folder itself) and check it has exactly the model's parameters, shape for shape."""
        import torch
        from diffusers import AutoModel
        from diffusers.hooks.group_offloading import _is_group_offload_enabled

        # Group offloading keeps its own host copy of each weight and onloads from it: a swapped
        # parameter would never reach the GPU.
        if _is_group_offload_enabled(transformer):
            raise ValueError("the transformer is group-offloaded: a checkpoint variant cannot swap into it")
        # The transformer's own weights by their checkpoint names (not the LoRA slot's): the same
        # Parameter objects for the life of the model, so read once.
        own = {
            name.replace(_PEFT_BASE, ""): parameter
            for name, parameter in transformer.named_parameters()
            if "lora_" not in name
        }
        self.parameters = own
        first = next(iter(own.values()))
        # torchao's FP8 layers hold their weights as tensor subclasses.
        if any(type(p.data) is not torch.Tensor for p in own.values()):
            raise ValueError(
                "this worker runs the transformer's linear layers in FP8: a checkpoint variant's bf16 "
                "weights cannot take their place (run the worker with FLEET_FP8=off)"
            )
        subfolder = None if (Path(path) / "config.json").is_file() else "transformer"
        loaded = AutoModel.from_pretrained(path, subfolder=subfolder, torch_dtype=first.dtype)
        if type(loaded) is not type(transformer):
            raise ValueError(
                f"{path} holds a {type(loaded).__name__}, the model a {type(transformer).__name__}"
            )
        state = dict(loaded.named_parameters())
        # Fused projections are the model's, not the checkpoint's: made from its parts below.
        fused = fused_names(list(own))
        missing = sorted(set(own) - set(state) - set(fused))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(
                f"{path} does not match the model's transformer: missing {missing[:3]}, extra {extra[:3]}"
            )
        for name, parameter in own.items():
            if name not in fused and state[name].shape != parameter.shape:
                raise ValueError(
                    f"{path}: {name} is {tuple(state[name].shape)}, the model's {tuple(parameter.shape)}"
                )
        # Where the model keeps its transformer between jobs: the GPU, or host memory (offloaded).
        self.device = device = first.device
        self.tensors = {
            name: state[name].detach().to(device, parameter.dtype)
            for name, parameter in own.items()
            if name not in fused
        }
        fuse_tensors(self.tensors, fused)
        # Each storage once: a fused layer's parts are views of it.
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors.values()
        }
        self.nbytes = sum(storages.values())

    def _swap(self) -> None:
        # Kept where they were loaded: an offloaded transformer's weights may be on the GPU when
        # a job fails mid-step; what is taken out of it goes back to host memory all the same.
        for name, parameter in self.parameters.items():
            self.tensors[name], parameter.data = parameter.data.to(self.device), self.tensors[name]

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The variant's weights in the transformer for the block, the model's own after it."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

"""The official tasks (``wan.WanS2V``, ``wan.WanT2V``, ``wan.WanI2V``) on a CPU (the tests: one
rank, or two over gloo).

Three replacements in each task module's namespace (``PATCHES``) and a float32 config
(``config_for``). On CUDA the official code casts to bfloat16 inside
``torch.amp.autocast("cuda")`` and opens float32 regions with
``torch.cuda.amp.autocast(dtype=torch.float32)``; CPU autocast has no float32 regions (bfloat16
and float16 only), so on a CPU the model runs in float32 throughout, which needs no autocast.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.adapters.wan_s2v.patch import Patch, apply

if TYPE_CHECKING:
    import torch


class _TorchNamingTheCpu(types.ModuleType):
    """``torch`` as a task module sees it on a CPU: a CUDA device names the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch, name)

    @staticmethod
    def device(*args: Any, **kwargs: Any) -> torch.device:
        import torch

        device = torch.device(*args, **kwargs)
        return torch.device("cpu") if device.type == "cuda" else device


def _shard_model_on_cpu(shard_model: Callable[..., Any]) -> Callable[..., Any]:
    def shard_model_on_cpu(model: Any, device_id: Any = None, **kwargs: Any) -> Any:
        import torch

        return shard_model(
            model,
            **{
                **kwargs,
                "device_id": torch.device("cpu"),
                "param_dtype": torch.float32,
                "sync_module_states": False,
            },
        )

    return shard_model_on_cpu


def _sp_attn_forward_in_float32(sp_attn_forward: Callable[..., Any]) -> Callable[..., Any]:
    def sp_attn_forward_in_float32(
        self: Any, x: Any, seq_lens: Any, grid_sizes: Any, freqs: Any, dtype: Any = None
    ) -> Any:
        import torch

        return sp_attn_forward(self, x, seq_lens, grid_sizes, freqs, dtype=torch.float32)

    return sp_attn_forward_in_float32


def _patches(module: str, sp_attn_forward: str) -> tuple[Patch, ...]:
    return (
        Patch(
            module,
            "torch",
            lambda _torch: _TorchNamingTheCpu(),
            "the task puts itself on torch.device(f'cuda:{device_id}'): that names the CPU",
        ),
        Patch(
            module,
            "shard_model",
            _shard_model_on_cpu,
            "FSDP gets the CPU as its device, float32 as its compute dtype and no rank-0 broadcast of "
            "the weights (FSDP broadcasts only from a GPU; every rank read the same files)",
        ),
        Patch(
            module,
            sp_attn_forward,
            _sp_attn_forward_in_float32,
            "the Ulysses attention keeps float32 instead of casting q, k, v to bfloat16",
        ),
    )


PATCHES = (
    *_patches("wan.speech2video", "sp_attn_forward_s2v"),
    *_patches("wan.text2video", "sp_attn_forward"),
    *_patches("wan.image2video", "sp_attn_forward"),
)


def run_on_cpu() -> None:
    """Let every task build and generate on a CPU, single or sharded over gloo (``PATCHES``)."""
    import sys

    if isinstance(sys.modules["wan.speech2video"].torch, _TorchNamingTheCpu):
        return
    warnings.filterwarnings("ignore", message=r".*CUDA is not available.*Disabling", category=UserWarning)
    apply(PATCHES)


def config_for(config: Any, device_type: str) -> Any:
    """A task's config as it runs on ``device_type``: ``param_dtype`` and ``t5_dtype`` are
    float32 on a CPU."""
    if device_type == "cuda":
        return config
    import copy

    import torch

    config = copy.deepcopy(config)
    config.param_dtype = torch.float32
    config.t5_dtype = torch.float32
    return config

"""Attention for the official code where flash-attn is not installed (``official.PATCHES``)."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def flash_attn_available() -> bool:
    """Whether flash-attn is installed: the official code then calls it, and needs no stand-in."""
    return any(importlib.util.find_spec(m) is not None for m in ("flash_attn_interface", "flash_attn"))


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: torch.Tensor | None = None,
    k_lens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype | None = None,
    version: int | None = None,
) -> torch.Tensor:
    """``wan.modules.attention.flash_attention`` on ``torch.nn.functional.scaled_dot_product_attention``.

    Same arguments and result: q ``[B, Lq, Nq, C]``, k/v ``[B, Lk, Nk, C]`` (Nq a multiple of
    Nk), output ``[B, Lq, Nq, C]`` in q's dtype. ``k_lens`` masks the padded keys of each sample
    (flash-attn's varlen packing drops them); ``q_lens`` zeroes the padded query rows. Inputs that
    are not half precision are cast to ``dtype`` (bfloat16 by default) as flash-attn needs; on a
    CPU they stay as they are. Sliding windows are refused: S2V never uses them.
    """
    import torch
    import torch.nn.functional as F

    if tuple(window_size) != (-1, -1):
        raise NotImplementedError("sdpa_attention has no sliding-window attention")
    out_dtype = q.dtype
    if q.device.type == "cuda":
        half = dtype if dtype is not None else torch.bfloat16
        q, k, v = (x if x.dtype in (torch.float16, torch.bfloat16) else x.to(half) for x in (q, k, v))
    q, k = q.to(v.dtype), k.to(v.dtype)
    if q_scale is not None:
        q = q * q_scale
    lq, lk = q.size(1), k.size(1)

    mask = None
    if k_lens is not None:
        k_lens = k_lens.to(device=q.device)
        if bool((k_lens < lk).any()):
            keep = torch.arange(lk, device=q.device)[None, :] < k_lens[:, None]  # [B, Lk]
            mask = keep[:, None, None, :]  # broadcast over heads and queries
    if causal and mask is not None:
        causal_keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        mask = mask & causal_keep
        causal = False

    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=causal,
        scale=softmax_scale,
        enable_gqa=q.size(2) != k.size(2),
    ).transpose(1, 2)
    if q_lens is not None:
        q_lens = q_lens.to(device=q.device)
        if bool((q_lens < lq).any()):
            rows = torch.arange(lq, device=q.device)[None, :] < q_lens[:, None]
            out = out * rows[:, :, None, None].to(out.dtype)
    return out.to(out_dtype).contiguous()

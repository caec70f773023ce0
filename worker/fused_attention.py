"""Qwen-Image's and Z-Image's attention processors, with query, key and value from one GEMM.

diffusers' processors for these two transformers compute each projection by itself and never
read ``fused_projections``, so ``Attention.fuse_projections`` changes nothing for them. These
subclasses read it (worker/fused.py sets them before it fuses): fused, the image stream's query,
key and value come from ``to_qkv`` and Qwen's text stream's from ``to_added_qkv``, each split in
three; unfused (a job through the LoRA slot), diffusers' own processor runs. After the
projections each does what diffusers' processor does, step for step. A test holds them to the
unfused model's output on the small models (tests/unit/test_fused_attention.py), which catches a
diffusers release that changes its processor's steps.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor


def _split(fused: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection's output, [batch, tokens, 3 x inner], as query, key and value, each
    [batch, tokens, heads, head_dim] (its rows are query's, then key's, then value's)."""
    query, key, value = fused.unflatten(-1, (3, -1, head_dim)).unbind(-3)
    return query, key, value


class FusedQwenDoubleStreamAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """Qwen-Image's joint attention over [text, image] tokens."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not attn.fused_projections:
            return super().__call__(
                attn,
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                attention_mask,
                image_rotary_emb,
            )
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("Qwen-Image's attention takes the text stream and no external attention_mask")

        # 1. The joint mask, text tokens' mask then the image's (all kept).
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]

        # 2. Query, key and value of each stream: one GEMM each.
        head_dim = attn.inner_dim // attn.heads
        img_query, img_key, img_value = _split(attn.to_qkv(hidden_states), head_dim)
        txt_query, txt_key, txt_value = _split(attn.to_added_qkv(encoder_hidden_states), head_dim)

        # 3. QK norms and rotary embeddings.
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        # 4. Joint attention, [text, image], at the backend the worker set.
        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint = dispatch_attention_fn(
            joint_query,
            torch.cat([txt_key, img_key], dim=1),
            torch.cat([txt_value, img_value], dim=1),
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        joint = joint.flatten(2, 3).to(joint_query.dtype)

        # 5. Each stream's output projection.
        img_out = attn.to_out[0](joint[:, seq_txt:, :].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        return img_out, attn.to_add_out(joint[:, :seq_txt, :].contiguous())


class FusedZSingleStreamAttnProcessor(ZSingleStreamAttnProcessor):
    """Z-Image's attention over one stream of text and image tokens."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not attn.fused_projections:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)

        # 1. Query, key and value: one GEMM.
        query, key, value = _split(attn.to_qkv(hidden_states), attn.inner_dim // attn.heads)

        # 2. QK norms and rotary embeddings (complex, in float32), back to the query's dtype.
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        dtype = query.dtype
        query, key = query.to(dtype), key.to(dtype)

        # 3. Attention, the mask [batch, tokens] broadcast over heads and queries.
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )

        # 4. The output projection.
        out = attn.to_out[0](out.flatten(2, 3).to(dtype))
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)  # dropout
        return out


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding: pairs of ``x`` as complex numbers times ``freqs_cis``."""
    with torch.amp.autocast("cuda", enabled=False):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


# diffusers' processor class of each model, and the fleet's that replaces it when fusing.
FUSED_PROCESSORS: dict[type, type] = {
    QwenDoubleStreamAttnProcessor2_0: FusedQwenDoubleStreamAttnProcessor,
    ZSingleStreamAttnProcessor: FusedZSingleStreamAttnProcessor,
}

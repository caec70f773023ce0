"""Small Wan2.2 TI2V-5B, T2V-A14B, I2V-A14B and Animate-14B.

Layouts follow the hub repos Wan-AI/Wan2.2-TI2V-5B-Diffusers (a ``WanPipeline`` with
``expand_timesteps=True``, which ``WanImageToVideoPipeline`` also loads),
Wan-AI/Wan2.2-T2V-A14B-Diffusers and Wan-AI/Wan2.2-I2V-A14B-Diffusers (two transformers,
``transformer`` for high noise and ``transformer_2`` for low noise, and the ``boundary_ratio``
between them in model_index.json; the I2V one without an image encoder) and
Wan-AI/Wan2.2-Animate-14B-Diffusers (a ``WanAnimatePipeline``). Layer sizes come from diffusers'
own fast pipeline tests. The config keys that decide what the pipelines accept match the real
models (latent channels, spatial and temporal compression, patch size, ``expand_timesteps``), except
the Animate face-crop size (``motion_encoder_size``: 16 here, 512 real), which callers read from
the config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# The same prompt-like text the other small tokenizers learn from.
from testkit.small_models.tokenizers import _CORPUS

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import T5Tokenizer, UMT5EncoderModel

VERSION = 2

# Dimensions of the tiny text encoder; the transformers' ``text_dim`` must equal it.
_TEXT_DIM = 32
# The tiny CLIP vision tower's width; the Animate transformer's ``image_dim`` must equal it.
_CLIP_DIM = 8

# The real CLIP ViT-H/14 preprocessing (OpenAI CLIP statistics, bicubic resize, center crop);
# only the pixel size is shrunk to the tiny vision tower's.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def t5_tokenizer(vocab_size: int = 400) -> T5Tokenizer:
    """Train a Unigram model on the built-in corpus and wrap it as a ``T5Tokenizer``.

    umT5's vocabulary is a SentencePiece Unigram model with ``<pad>``, ``</s>``, ``<unk>`` at ids
    0, 1, 2; training from an empty ``T5Tokenizer`` reuses its exact pre-tokenizer (whitespace
    split + metaspace), so only the pieces and their scores are learnt here.
    """
    from tokenizers import trainers
    from transformers import T5Tokenizer

    backend = T5Tokenizer(extra_ids=0).backend_tokenizer
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    pieces = [(piece, score) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
    # The class appends T5-style sentinel tokens (<extra_id_N>) after the learnt pieces.
    return T5Tokenizer(vocab=pieces, model_max_length=512)


def _umt5_encoder(tokenizer: T5Tokenizer) -> UMT5EncoderModel:
    """A two-layer umT5 encoder over ``tokenizer``'s vocabulary (gated-GELU, as umt5-xxl)."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _measure_latent_stats(vae: AutoencoderKLWan) -> None:
    """Set ``latents_mean``/``latents_std`` to what this VAE's encoder really produces.

    The real statistics were measured on the real encoder so that normalized latents have unit
    scale; a random encoder's latents are ~10x smaller, and the real values would drown every
    conditioning input (image, pose, background) in a constant. Measuring them the same way on a
    fixed synthetic clip keeps the conditioning as strong, relatively, as in the real model.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    clip = torch.rand(1, 3, 9, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(clip).latent_dist.mode()
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(
        latents_mean=[round(v, 6) for v in mean.tolist()], latents_std=[round(v, 6) for v in std.tolist()]
    )


def _sharpen_cross_attention(transformer: torch.nn.Module, gain: float = 3.0) -> None:
    """Raise the text cross-attention's query/key norm gains so the prompt shows in the output.

    The pipelines pad every prompt to 512 tokens; random attention spreads almost evenly over
    them, so a prompt's handful of real tokens would be averaged away (trained attention picks
    them out). Sharper logits let them through, and tests can see the prompt condition the video.
    """
    import torch

    with torch.no_grad():
        for block in transformer.blocks:
            block.attn2.norm_q.weight.mul_(gain)
            block.attn2.norm_k.weight.mul_(gain)


def _flow_unipc() -> UniPCMultistepScheduler:
    """The scheduler both real repos ship: UniPC on flow-matching sigmas with shift 5."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )


def build_wan22_ti2v_5b(out: Path) -> None:
    """Tiny Wan-AI/Wan2.2-TI2V-5B-Diffusers: 48-channel latents, 16x VAE, 2x2 patches, 4x time."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    torch.manual_seed(0)
    # The Wan2.2 VAE: a residual encoder/decoder over 2x2 pixel patches (12 = 3 * 2 * 2 channels)
    # with three 2x downsamples, so 16x spatially, and 4x in time. Only the widths are tiny.
    vae = AutoencoderKLWan(
        base_dim=4,
        decoder_base_dim=4,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
    )
    _measure_latent_stats(vae)

    torch.manual_seed(0)
    transformer = _tiny_wan_transformer(in_channels=48, out_channels=48)

    tokenizer = t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(tokenizer),
        vae=vae,
        scheduler=_flow_unipc(),
        transformer=transformer,
        # TI2V: per-token timesteps, so image-to-video can hold the first latent frame clean.
        expand_timesteps=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def _wan21_vae() -> AutoencoderKLWan:
    """The Wan2.1 VAE the 14B models use (plain, no pixel patches): 8x spatially, 4x in time."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    _measure_latent_stats(vae)
    return vae


def _a14b_expert(in_channels: int, seed: int) -> torch.nn.Module:
    """One tiny A14B expert; each expert its own seed, so the two differ as the real ones do."""
    import torch

    torch.manual_seed(seed)
    return _tiny_wan_transformer(in_channels=in_channels, out_channels=16)


def _tiny_wan_transformer(in_channels: int, out_channels: int) -> torch.nn.Module:
    """A two-layer Wan transformer drawn from the current seed, its cross-attention sharpened."""
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        # The real model's RoPE length: the tiny one then accepts every size the catalog allows.
        rope_max_seq_len=1024,
    )
    _sharpen_cross_attention(transformer)
    return transformer


def build_wan22_t2v_a14b(out: Path) -> None:
    """Tiny Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts over 16-channel latents, boundary 0.875."""
    from diffusers import WanPipeline

    _build_a14b(out, WanPipeline, in_channels=16, boundary_ratio=0.875)


def build_wan22_i2v_a14b(out: Path) -> None:
    """Tiny Wan-AI/Wan2.2-I2V-A14B-Diffusers: two experts taking the noise latents with the image's
    (16 + 4 mask + 16 = 36 channels), no image encoder, boundary 0.9."""
    from diffusers import WanImageToVideoPipeline

    _build_a14b(out, WanImageToVideoPipeline, in_channels=36, boundary_ratio=0.9)


def _build_a14b(out: Path, pipeline_class: type, in_channels: int, boundary_ratio: float) -> None:
    tokenizer = t5_tokenizer()
    pipe = pipeline_class(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(tokenizer),
        vae=_wan21_vae(),
        scheduler=_flow_unipc(),
        transformer=_a14b_expert(in_channels, seed=1),
        transformer_2=_a14b_expert(in_channels, seed=2),
        boundary_ratio=boundary_ratio,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def build_wan22_animate_14b(out: Path) -> None:
    """Tiny Wan-AI/Wan2.2-Animate-14B-Diffusers: Wan2.1 VAE (16 channels, 8x), CLIP image tower."""
    import torch
    from diffusers import AutoencoderKLWan, WanAnimatePipeline, WanAnimateTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    # The Wan2.1 VAE (plain, no pixel patches): 8x spatially and 4x in time.
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    _measure_latent_stats(vae)

    torch.manual_seed(0)
    heads, head_dim = 2, 12
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        # noise latents + reference/previous-segment latents + 4 mask channels
        in_channels=36,
        latent_channels=16,
        out_channels=16,
        text_dim=_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=_CLIP_DIM,
        # As in the real model: image tokens get their own key/value projections of the full width.
        added_kv_proj_dim=heads * head_dim,
        rope_max_seq_len=1024,
        # The face video is fed at motion_encoder_size squared (512 for the real model); the
        # channel table needs one entry per power of two from 4 up to that size.
        motion_encoder_size=16,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=16,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    )
    _sharpen_cross_attention(transformer)

    torch.manual_seed(0)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=_CLIP_DIM,
            intermediate_size=16,
            projection_dim=_CLIP_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
        )
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        resample=3,  # bicubic
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )

    tokenizer = t5_tokenizer()
    pipe = WanAnimatePipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(tokenizer),
        vae=vae,
        scheduler=_flow_unipc(),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    _record_class(out, "image_processor", "CLIPImageProcessor")
    # The official preprocessing's detector, pose model and SAM2, where the real repo keeps them.
    from testkit.small_models.animate_preprocess import build_process_checkpoint

    build_process_checkpoint(out / "process_checkpoint")


def _record_class(out: Path, component: str, class_name: str) -> None:
    """Name ``component``'s class in model_index.json as the real repo does.

    Without torchvision, transformers 5 makes ``CLIPImageProcessor`` a PIL-backed class and
    ``save_pretrained`` records that class's own name; the real repo names ``CLIPImageProcessor``,
    which loads as whichever backend the machine has, so the small model should too.
    """
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index[component] = ["transformers", class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


BUILDERS: dict[str, Callable[[Path], None]] = {
    "wan2.2-ti2v-5b": build_wan22_ti2v_5b,
    "wan2.2-t2v-a14b": build_wan22_t2v_a14b,
    "wan2.2-i2v-a14b": build_wan22_i2v_a14b,
    "wan2.2-animate-14b": build_wan22_animate_14b,
}

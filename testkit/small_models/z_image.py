"""Small Tongyi-MAI/Z-Image-Turbo."""

from __future__ import annotations

from pathlib import Path

from testkit.small_models.tokenizers import qwen_tokenizer

VERSION = 2


def build_z_image_turbo(out: Path) -> None:
    """Tiny Tongyi-MAI/Z-Image-Turbo: sizes from diffusers' own pipeline test, 4-block VAE."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        # RoPE tables as long as the real model's, so the small model accepts every size the
        # catalog allows (up to 2048 px a side).
        axes_lens=[1536, 512, 512],
    )
    # Older diffusers allocate these with torch.empty (may hold NaN); pin them.
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)

    torch.manual_seed(0)
    # Four blocks give the real model's scale factor 8, so the pipeline enforces the same
    # multiple-of-16 sizes; no quant convs, as in the real (Flux) VAE.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 16, 16, 16],
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=16,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )

    # The real Z-Image-Turbo scheduler config: fixed shift 3, no resolution-dependent shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16,  # must equal the transformer's cap_feat_dim
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )

    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(out, safe_serialization=True)


BUILDERS = {"z-image-turbo": build_z_image_turbo}

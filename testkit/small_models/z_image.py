"""Small Tongyi-MAI/Z-Image-Turbo, Z-Image and Z-Image-Omni-Base.

The three share one architecture (a single-stream DiT over text and image tokens, a Qwen3 text
encoder, a Flux-style VAE); Omni-Base adds a SigLIP2 vision encoder whose features of each input
image join the sequence, and the transformer layers that take them in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testkit.small_models.tokenizers import qwen_tokenizer

VERSION = 2

_SIGLIP_DIM = 16


def _components(siglip_feat_dim: int | None = None) -> dict[str, Any]:
    """Transformer, VAE, scheduler, tokenizer and text encoder: sizes from diffusers' own
    pipeline test, a 4-block VAE."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
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
        siglip_feat_dim=siglip_feat_dim,
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
        if transformer.siglip_pad_token is not None:
            transformer.siglip_pad_token.fill_(1.0)

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

    # The Z-Image-Turbo scheduler config: fixed shift 3, no resolution-dependent shift.
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
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_z_image_turbo(out: Path) -> None:
    """Tiny Tongyi-MAI/Z-Image-Turbo."""
    from diffusers import ZImagePipeline

    ZImagePipeline(**_components()).save_pretrained(out, safe_serialization=True)


def build_z_image(out: Path) -> None:
    """Tiny Tongyi-MAI/Z-Image: Turbo's architecture and layout, undistilled (random weights
    either way: the two differ here only in their catalog entries)."""
    from diffusers import ZImagePipeline

    ZImagePipeline(**_components()).save_pretrained(out, safe_serialization=True)


def build_z_image_omni_base(out: Path) -> None:
    """Tiny Tongyi-MAI/Z-Image-Omni-Base: the transformer with its SigLIP layers, a SigLIP2 vision
    model (patch 16, NaFlex: each image keeps its aspect ratio) and its image processor."""
    import torch
    from diffusers import ZImageOmniPipeline
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    components = _components(siglip_feat_dim=_SIGLIP_DIM)
    torch.manual_seed(0)
    siglip = Siglip2VisionModel(
        Siglip2VisionConfig(
            hidden_size=_SIGLIP_DIM,  # must equal the transformer's siglip_feat_dim
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=16,
            num_patches=64,
        )
    )
    # The PIL processor needs no torchvision; it saves the same preprocessor config as the
    # torchvision one, which transformers loads where torchvision is installed.
    processor = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=64)
    pipe = ZImageOmniPipeline(siglip=siglip, siglip_processor=processor, **components)
    pipe.save_pretrained(out, safe_serialization=True)
    # The real repository names the processor class, not its PIL backend; transformers picks the
    # backend when loading.
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["siglip_processor"] = ["transformers", "Siglip2ImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")


BUILDERS = {
    "z-image-turbo": build_z_image_turbo,
    "z-image": build_z_image,
    "z-image-omni-base": build_z_image_omni_base,
}

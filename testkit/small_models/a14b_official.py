"""Small random-weight official checkpoints of Wan-AI/Wan2.2-T2V-A14B and Wan2.2-I2V-A14B, what the
h100x8 class's torchrun group loads (``routing.catalog.checkpoint_spec``: the keys
``<model>-official``).

``wan.WanT2V`` / ``wan.WanI2V(config=WAN_CONFIGS["t2v-A14B" | "i2v-A14B"], checkpoint_dir=DIR)``
load, from ``DIR``:

    high_noise_model/config.json, diffusion_pytorch_model.safetensors   WanModel.from_pretrained
    low_noise_model/config.json, diffusion_pytorch_model.safetensors    (one expert each)
    models_t5_umt5-xxl-enc-bf16.pth                                     T5 encoder state dict
    google/umt5-xxl/                                                    its tokenizer
    Wan2.1_VAE.pth                                                      Wan2.1 VAE state dict

The experts are the package's own ``WanModel`` with the task's config (patch size, norms, the
image-to-video model's 36 input channels: noise, mask and the encoded first frame) at small
widths, each with its own random weights; T5 and the VAE are S2V's small ones
(``testkit.small_models.s2v``), their sizes in ``fleet-small-model.json``. No ``max_area``: a
test asks for the small sizes it wants.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from testkit.small_models.s2v import check_t5_loads, randomise_zero_weights, save_t5_and_vae

VERSION = 2

# 8 heads of 16: Ulysses splits them over 1, 2, 4 or 8 ranks.
DIT = {"dim": 128, "ffn_dim": 256, "num_heads": 8, "num_layers": 2}
# (folder, seed): the two experts differ.
EXPERTS = (("high_noise_model", 0), ("low_noise_model", 1))


def build_official(out: Path, task: str) -> None:
    """The small official checkpoint of ``task`` ("t2v-A14B" or "i2v-A14B") in ``out``."""
    import torch

    from worker.adapters.wan_s2v.official import import_wan_modules

    wan = import_wan_modules()
    config = wan["configs"].WAN_CONFIGS[task]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # 1-2. Text (T5 tokenizer and encoder) and the VAE.
    save_t5_and_vae(out, max_area=None)

    # 3. The two experts: the task's DiT config at small widths.
    image_to_video = task.startswith("i2v")
    settings = {
        "model_type": "i2v" if image_to_video else "t2v",
        "patch_size": tuple(config.patch_size),
        "text_len": config.text_len,
        # Image-to-video: the latents, the first-frame mask (4 channels) and the encoded image.
        "in_dim": 16 + 4 + 16 if image_to_video else 16,
        "freq_dim": config.freq_dim,
        "out_dim": 16,
        "window_size": tuple(config.window_size),
        "qk_norm": config.qk_norm,
        "cross_attn_norm": config.cross_attn_norm,
        "eps": config.eps,
        **DIT,
    }
    for folder, seed in EXPERTS:
        torch.manual_seed(seed)
        expert = wan["model"].WanModel(**settings)
        randomise_zero_weights(expert)
        expert.to(torch.bfloat16).save_pretrained(out / folder, safe_serialization=True)

    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "WanI2V" if image_to_video else "WanT2V",
                "_layout": f"official Wan2.2 {task} checkpoint directory (wan22), small random weights",
                "task": task,
            },
            indent=2,
        )
    )
    check_t5_loads(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "wan2.2-t2v-a14b-official": lambda out: build_official(out, "t2v-A14B"),
    "wan2.2-i2v-a14b-official": lambda out: build_official(out, "i2v-A14B"),
}

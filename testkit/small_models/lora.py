"""Small LoRAs for the small models, built with peft (the ``dev`` extra), for tests and
benchmarks: a random LoRA on the transformer layers the catalog lets LoRAs target, saved as
safetensors in diffusers' layout (``transformer.<module>.lora_A.weight``)."""

from __future__ import annotations

from pathlib import Path

from routing.catalog import get_model


def build_lora(
    model_dir: Path, model_key: str, out: Path, rank: int = 4, seed: int = 0, subfolder: str = "transformer"
) -> Path:
    """Write a rank-``rank`` LoRA for the small ``model_key`` at ``model_dir`` to ``out``, for its
    ``subfolder`` transformer (``transformer_2``: a two-expert model's low-noise expert)."""
    import torch
    from diffusers import AutoModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    spec = get_model(model_key)
    transformer = AutoModel.from_pretrained(str(model_dir), subfolder=subfolder)
    torch.manual_seed(seed)
    # Not peft's default zero B: a LoRA that does nothing would prove nothing.
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=spec.lora_modules, init_lora_weights=False)
    transformer.add_adapter(config)
    state = get_peft_model_state_dict(transformer)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"transformer.{name}": tensor.contiguous() for name, tensor in state.items()}, out)
    return out

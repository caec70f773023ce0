"""Small LoRAs for the small models, built with peft (the ``dev`` extra), for tests and
benchmarks: a random LoRA on the transformer layers the catalog lets LoRAs target, saved as
safetensors in diffusers' layout (``transformer.<module>.lora_A.weight``); and small distilled
checkpoints of a transformer, for the variants that are one (``build_checkpoint``)."""

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


def build_checkpoint(model_dir: Path, out: Path, seed: int = 0, spread: float = 0.5) -> Path:
    """Write a distilled checkpoint of the small model at ``model_dir``'s transformer to
    ``out/transformer`` (diffusers' layout, as FastWan's repository has it): the same class and
    configuration, every weight moved by ``spread`` of its tensor's own spread, at random."""
    import torch
    from diffusers import AutoModel

    transformer = AutoModel.from_pretrained(str(model_dir), subfolder="transformer")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in transformer.parameters():
            scale = parameter.float().std() if parameter.numel() > 1 else parameter.abs().float()
            noise = torch.randn(parameter.shape, generator=generator) * scale * spread
            parameter.add_(noise.to(parameter.dtype))
    transformer.save_pretrained(str(out / "transformer"))
    return out

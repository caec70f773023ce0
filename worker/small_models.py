"""Build small random-weight copies of the catalog's pipelines.

Each builder uses the real diffusers/transformers classes and writes a normal diffusers
repo layout with ``save_pretrained``, so the worker loads it with the very same
``from_pretrained(path)`` call it uses for real weights. Used by tests and the demo on
machines with no GPU and no model hub access.

    python -m worker.small_models --out DIR [--models z-image-turbo ...] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MARKER = ".small-model-complete"

# Bump a model's version whenever its builder changes what it writes: directories built
# by an older builder are then rebuilt instead of skipped.
VERSIONS: dict[str, int] = {"z-image-turbo": 2}

# Byte-level BPE learns its merges from this; prompt-like text keeps common words short.
_CORPUS = """\
a red fox sitting in the snow at sunrise, highly detailed photograph
a cat sleeping on a wooden table next to a window with soft morning light
a blue car driving along a mountain road under a cloudy sky
portrait of an old man with a white beard, studio lighting, black and white
a bowl of fresh fruit: apples, oranges, bananas and grapes on a kitchen counter
a small house by the lake surrounded by green trees and yellow flowers
an astronaut riding a horse on the moon, digital art, cinematic
the city skyline at night with bright lights reflected in the river
a girl in a red dress walking through a field of tall grass in summer
a dog running on the beach with waves in the background, golden hour
a cup of coffee and a book on a rainy day, cozy, warm colors
an oil painting of a ship on a stormy sea with dark clouds and lightning
a close-up of a butterfly on a purple flower, macro photo, shallow depth of field
a watercolor illustration of a forest path in autumn with orange leaves
a robot standing in the middle of a busy street, neon signs, futuristic
text that says "hello world" written on a chalkboard in white letters
two people sitting on a bench in the park and talking about the weather
The quick brown fox jumps over the lazy dog. 0123456789
system: you are a helpful assistant. user: draw a picture. assistant: think first
"""

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Plain added tokens in Qwen3 (special=False): they stay in decoded text.
_THINK_TOKENS = ["<think>", "</think>"]

# Qwen3's template, trimmed to what prompts need (no tools); the output for plain
# user/system/assistant messages matches the real one, including enable_thinking.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def _qwen_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE on the built-in corpus and wrap it as a ``Qwen2Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Start from an empty Qwen2Tokenizer so training uses exactly its normalizer and
    # pre-tokenizer (regex split + byte level); then load the learnt vocab/merges into it.
    backend: Tokenizer = Qwen2Tokenizer().backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=32768,
        chat_template=_CHAT_TEMPLATE,
    )
    tok.add_special_tokens({"additional_special_tokens": _SPECIAL_TOKENS[1:]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _THINK_TOKENS])
    return tok


def _build_z_image_turbo(out: Path) -> None:
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

    tokenizer = _qwen_tokenizer()
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


BUILDERS: dict[str, Callable[[Path], None]] = {
    "z-image-turbo": _build_z_image_turbo,
}


def is_complete(model_dir: Path, key: str) -> bool:
    """True if ``model_dir`` holds a finished build of ``key`` by the current builder."""
    try:
        json.loads((model_dir / "model_index.json").read_text())
        return (model_dir / MARKER).read_text().strip() == str(VERSIONS[key])
    except (OSError, ValueError):
        return False


def _build_one(key: str, out_dir: Path) -> None:
    target = out_dir / key
    # Same filesystem as the target so the final rename is atomic: a killed build leaves
    # only a hidden temp dir, never a half model under the model's own name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=out_dir))
    try:
        BUILDERS[key](tmp)
        (tmp / MARKER).write_text(f"{VERSIONS[key]}\n")
        if target.exists():
            old = target.with_name(f".{key}.old-{os.getpid()}")
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(out_dir: Path, models: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Build each model (all by default) into ``out_dir/<key>``; return key -> directory."""
    out_dir = Path(out_dir)
    keys = list(BUILDERS) if models is None else list(models)
    unknown = [k for k in keys if k not in BUILDERS]
    if unknown:
        raise ValueError(f"no small-model builder for {unknown}; known: {sorted(BUILDERS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for key in keys:
        start = time.perf_counter()
        target = out_dir / key
        if not force and is_complete(target, key):
            state = "already present"
        else:
            _build_one(key, out_dir)
            state = "built"
        print(f"{key}: {state} in {time.perf_counter() - start:.1f}s -> {target}", flush=True)
        built[key] = target
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.small_models", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory that receives one folder per model"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(BUILDERS), help="model keys (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build is present")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the output to one line per model
    build(args.out, args.models, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())

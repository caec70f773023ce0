"""Small random-weight Wan-AI/Wan2.2-S2V-14B, in the official checkpoint layout.

``wan.WanS2V(config=WAN_CONFIGS["s2v-14B"], checkpoint_dir=DIR)`` loads, from ``DIR``:

    config.json, diffusion_pytorch_model.safetensors   WanModel_S2V.from_pretrained(DIR)
    models_t5_umt5-xxl-enc-bf16.pth                    T5 encoder state dict (torch.load)
    google/umt5-xxl/                                   its tokenizer (AutoTokenizer)
    Wan2.1_VAE.pth                                     Wan2.1 VAE state dict (torch.load)
    wav2vec2-large-xlsr-53-english/                    Wav2Vec2ForCTC + Wav2Vec2Processor

Everything is made with the package's own classes (``WanModel_S2V``, ``T5Encoder`` through
``umt5_xxl``, ``WanVAE_`` through ``_video_vae``) and saved as the official files are. The official
code hard-codes the sizes of T5 (umt5-xxl) and of the VAE; this checkpoint's smaller ones are in
``fleet-small-model.json``, which ``testkit.s2v`` reads while loading. The DiT keeps the
s2v-14B structure (frame packing, AdaIN audio injection, pose conditioning) with small widths;
the audio encoder keeps 24 layers, as the DiT weighs wav2vec2's 25 hidden states.

A ``model_index.json`` names the layout so ``testkit.small_models.is_complete`` recognises the
build; the official code never reads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VERSION = 3

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"

# DiT: 8 heads of 16 (so Ulysses splits it over 1, 2, 4 or 8 ranks), two blocks, both audio-injected.
DIT = {"dim": 128, "ffn_dim": 256, "num_heads": 8, "num_layers": 2, "audio_inject_layers": [0, 1]}
AUDIO_DIM = 32  # wav2vec2 hidden size = the DiT's audio_dim
# T5 keeps umt5-xxl's width (4096): WanModel_S2V does not save ``text_dim`` in its config.json
# (it is in ``ignore_for_config``), so the DiT always expects 4096-wide text. Everything inside
# the encoder's blocks is narrow.
T5 = {"dim": 4096, "dim_attn": 32, "dim_ffn": 32, "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2}
# The Wan2.1 VAE's layout (z_dim 16, three spatial and two temporal downsamplings) at a narrow
# width and one residual block a level: its 3-D convolutions are most of a CPU job's time.
VAE = {"dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}
# Pixels a frame of this checkpoint is rendered at, at most, whatever size a job asks for (the
# official code fits the frame in it at multiples of 64): 128*64 for the landscape sizes, 64*128
# for the portrait ones. Keeps a CPU job at seconds; the real checkpoint renders the size asked.
MAX_AREA = 128 * 64


def build_wan22_s2v_14b(out: Path, max_area: int | None = MAX_AREA) -> None:
    """The small checkpoint in ``out``; ``max_area=None`` renders the sizes jobs ask for (a GPU)."""
    import torch

    from worker.adapters.wan_s2v.official import import_wan_modules

    wan = import_wan_modules()
    config = wan["configs"].WAN_CONFIGS["s2v-14B"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # 1-2. Text (T5 tokenizer and encoder) and the VAE.
    save_t5_and_vae(out, max_area)

    # 3. DiT: s2v-14B's transformer config with small widths.
    settings = {k: v for k, v in dict(config.transformer).items() if k != "__name__"}
    settings.update(DIT, audio_dim=AUDIO_DIM, text_len=config.text_len)
    torch.manual_seed(0)
    dit = wan["model_s2v"].WanModel_S2V(**settings)
    randomise_zero_weights(dit)
    dit.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)

    # 4. Speech: wav2vec2 (CTC head, as the official model) and its processor.
    _save_wav2vec2(out / WAV2VEC_DIR)

    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "WanS2V",
                "_layout": "official Wan2.2-S2V-14B checkpoint directory (wan22), small random weights",
                "task": "s2v-14B",
            },
            indent=2,
        )
    )
    check_t5_loads(out)


def save_t5_and_vae(out: Path, max_area: int | None) -> None:
    """What every official checkpoint holds beside its DiTs: the T5 tokenizer and encoder (the
    encoder half of umt5_xxl at small sizes) and the Wan2.1 VAE (z_dim 16, narrow), with their
    sizes and ``max_area`` in ``SMALL_MODEL_FILE``."""
    import torch

    from testkit.s2v.small import SMALL_MODEL_FILE
    from testkit.small_models.wan import t5_tokenizer
    from worker.adapters.wan_s2v.official import import_wan_modules

    wan = import_wan_modules()
    tokenizer = t5_tokenizer()
    tokenizer.save_pretrained(out / T5_TOKENIZER_DIR)
    t5_sizes = {**T5, "vocab_size": len(tokenizer)}
    (out / SMALL_MODEL_FILE).write_text(
        json.dumps(
            {"t5": t5_sizes, "vae": VAE, "max_area": max_area, "note": "small random-weight test model"},
            indent=2,
        )
    )
    torch.manual_seed(0)
    encoder = wan["t5"].umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=torch.bfloat16, **t5_sizes)
    torch.save(encoder.state_dict(), out / T5_FILE)

    # ``_video_vae`` builds on the meta device and loads a file, so the random weights are made
    # here and saved in the same form.
    torch.manual_seed(0)
    vae = wan["vae2_1"].WanVAE_(
        z_dim=16,
        **VAE,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    )
    torch.save(vae.state_dict(), out / VAE_FILE)


def check_t5_loads(out: Path) -> None:
    """The build must load the way the worker loads it."""
    import torch

    from testkit.s2v.small import small_model_sizes
    from worker.adapters.wan_s2v.official import import_wan_modules

    wan = import_wan_modules()
    with small_model_sizes(out):
        wan["t5"].umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=torch.bfloat16).load_state_dict(
            torch.load(out / T5_FILE, map_location="cpu")
        )


def randomise_zero_weights(model: torch.nn.Module) -> None:
    """The official DiTs zero-initialise their output head (s2v-14B also its audio injection and
    pose encoder: training starts from "no effect"); random weights there make every input
    change the output."""
    import torch

    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.ndim >= 2 and not bool(param.any()):
                param.normal_(std=0.02)


def _save_wav2vec2(path: Path) -> None:
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    path.mkdir(parents=True, exist_ok=True)
    letters = list("abcdefghijklmnopqrstuvwxyz'")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4} | {c: i + 5 for i, c in enumerate(letters)}
    vocab_file = path / "vocab.json"
    vocab_file.write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), word_delimiter_token="|")
    # xlsr-53's feature extractor settings: 16 kHz, normalised, with attention masks.
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)

    torch.manual_seed(0)
    # Layer-norm feature extractor and stable layer norm, as wav2vec2-large-xlsr-53; the
    # convolution strides are the real ones (320 samples a frame: 50 frames a second).
    model = Wav2Vec2ForCTC(
        Wav2Vec2Config(
            vocab_size=len(vocab),
            hidden_size=AUDIO_DIM,
            num_hidden_layers=24,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16,) * 7,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            pad_token_id=0,
            mask_time_prob=0.0,
        )
    )
    model.save_pretrained(path, safe_serialization=True)


BUILDERS: dict[str, Callable[[Path], None]] = {"wan2.2-s2v-14b": build_wan22_s2v_14b}

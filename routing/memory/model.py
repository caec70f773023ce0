"""The memory model: a request's predicted GPU peak for a model placed one way on one card.

A pipeline call runs in phases, each with some weights on the GPU and some activations:

- encode: the text (and image, audio) encoders over the prompt and inputs;
- denoise: the transformer over the latent tokens, once per step (twice with guidance when the
  pipeline batches the two passes);
- decode: the VAE from latents to pixels (a tile at a time with VAE tiling), plus, for a video,
  the decoded clip itself.

The peak is the largest phase: its weights on the GPU (``weights.json``, exact) plus its
activations (``activations.json``: measured or estimated coefficients times the request's
tokens or pixels). Which weights are on the GPU during a phase is what a placement mode decides.
Pure Python on purpose: the API routes by it without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

from routing.classes import VramClass

HERE = Path(__file__).resolve().parent
GIB = 2**30

ENCODERS = ("text_encoder", "image_encoder", "audio_encoder", "siglip")
# Wan2.2-A14B's second expert: the low-noise one, denoising after the boundary timestep.
SECOND_EXPERT = "transformer_2"
# Bytes a decoded video takes per value while the pipeline turns it into frames: the VAE's
# bf16 output and a float32 copy (estimate).
DECODED_BYTES_PER_VALUE = 6
# The official code's DiTs as FSDP holds their shards: float32 (``_sharded_bytes``).
FSDP_DIT_BYTES_PER_PARAM = 4


class Mode(StrEnum):
    """How a model's weights are placed on a worker's GPU."""

    RESIDENT = "resident"  # every component on the GPU, always
    TEXT_ENCODER_OFFLOAD = "text-encoder-offload"  # encoders leave the GPU once the prompt is encoded
    MODEL_OFFLOAD = "model-offload"  # diffusers model CPU offload: one component on the GPU at a time
    GROUP_OFFLOAD = "group-offload"  # diffusers group offload, block level, prefetched on a CUDA stream
    FP8 = "fp8"  # resident, the transformer's linear weights in FP8 (torchao); needs an FP8 card
    SHARDED = "sharded"  # FSDP + Ulysses over the worker's GPUs (the torchrun group), per rank
    # Two-expert models (Wan2.2-A14B): the VAE and the running expert stay on the GPU, the idle
    # expert waits in host memory and the encoders come on only while encoding.
    EXPERT_OFFLOAD = "expert-offload"


# Modes the fleet's workers apply today (worker.adapters.base.Runtime.place, worker.group, and for
# expert offload worker.adapters.wan.ExpertPlacement); the others have footprints here so an
# operator can weigh them, but no catalog entry uses them.
WORKER_MODES = frozenset({Mode.RESIDENT, Mode.MODEL_OFFLOAD, Mode.SHARDED, Mode.EXPERT_OFFLOAD})


@dataclass(frozen=True)
class Placement:
    mode: Mode
    # Decode in tiles (diffusers' enable_tiling): the VAE tiles only images larger than a tile.
    vae_tiling: bool = False

    def __str__(self) -> str:
        return f"{self.mode.value}{' + VAE tiling' if self.vae_tiling else ''}"


def applies_loras(placement: Placement) -> bool:
    """Whether a worker placing a model this way applies a request's LoRAs and variants: the
    torchrun group (sharded) runs the official code, which has no LoRA slot."""
    return placement.mode is not Mode.SHARDED


@dataclass(frozen=True)
class Card:
    """One GPU of a class: the memory a request must fit (before the margin)."""

    gib: float
    fp8: bool  # every card of the class computes in FP8 (compute capability 8.9 or above)
    note: str


CARDS: dict[VramClass, Card] = {
    VramClass.GPU16: Card(
        16.0,
        fp8=False,
        note="the class promises 16 GiB; its g5 (A10G, no FP8) and g6 (L4) cards have 24 GB",
    ),
    VramClass.GPU80: Card(80.0, fp8=False, note="H100 80GB or A100 80GB (no FP8)"),
    VramClass.H100X8: Card(80.0, fp8=True, note="H100 80GB, per rank of eight"),
}


@dataclass(frozen=True)
class Work:
    """What a request asks of the GPU, as the memory model reads it."""

    width: int
    height: int
    frames: int = 0  # 0: an image
    guidance: bool = False  # guidance on: a second pass each step
    input_images: int = 0  # edit inputs, each adding condition tokens
    outputs: int = 1  # images of one job: one pipeline call each, or one batch ("outputs": "batched")
    # The request carries LoRAs or a variant: only a placement that applies them takes it
    # (``applies_loras``).
    loras: bool = False
    # The request's variant (a checkpoint variant's transformer is kept beside the model's, where
    # a worker's pool makes room for it before its first job: worker.pool).
    variant: str | None = None

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


@dataclass(frozen=True)
class Prediction:
    peak_gib: float
    phase: str  # the phase that sets the peak
    measured: bool  # that phase's activation coefficient was measured on a GPU
    weights_gib: float  # weights on the GPU during that phase


@cache
def weights() -> dict[str, dict[str, dict[str, int]]]:
    """Per model, per component: params, bytes (bf16), largest block, linear weight bytes."""
    return json.loads((HERE / "weights.json").read_text())


@cache
def activations() -> dict[str, Any]:
    return json.loads((HERE / "activations.json").read_text())


def has_data(model: str) -> bool:
    return model in weights() and model in activations()["models"]


def weights_gib(model: str, mode: Mode = Mode.RESIDENT, ranks: int = 1) -> float:
    """Weights the mode keeps on one GPU between phases (what the pool holds while idle)."""
    parts = weights()[model]
    if mode is Mode.RESIDENT:
        return _sum(parts) / GIB
    if mode is Mode.FP8:
        return (_sum(parts) - _fp8_saved(parts)) / GIB
    if mode is Mode.TEXT_ENCODER_OFFLOAD:
        return _sum({k: v for k, v in parts.items() if k not in ENCODERS}) / GIB
    if mode is Mode.SHARDED:
        return _sharded_bytes(parts, ranks) / GIB
    if mode is Mode.EXPERT_OFFLOAD:
        return _sum(_one_expert({k: v for k, v in parts.items() if k not in ENCODERS})) / GIB
    return 0.0  # model and group offload keep the weights in host memory


def predict(model: str, placement: Placement, work: Work, ranks: int = 1) -> Prediction:
    """The peak GPU memory of one pipeline call of ``work`` placed by ``placement``."""
    parts = weights()[model]
    data = activations()["models"][model]
    acts = _activations(data, work, placement.vae_tiling)
    phases = [(phase, _on_gpu(parts, placement.mode, phase, ranks), gib) for phase, gib in acts.items()]
    if placement.mode is Mode.SHARDED:
        # Ulysses splits the sequence over the ranks; each rank decodes on its own.
        phases = [(p, w, gib / ranks if p == "denoise" else gib) for p, w, gib in phases]
    phase, on_gpu, act = max(phases, key=lambda p: p[1] + p[2])
    # Measured: the phase's coefficient was, and the mode holds exactly counted weights during
    # it (block groups, FSDP shards and FP8 compute are reasoned, not measured).
    exact = placement.mode in (
        Mode.RESIDENT,
        Mode.TEXT_ENCODER_OFFLOAD,
        Mode.MODEL_OFFLOAD,
        Mode.EXPERT_OFFLOAD,
    )
    measured = exact and data["encode_gib" if phase == "encode" else phase]["basis"] == "measured"
    return Prediction(round(on_gpu + act, 2), phase, measured, round(on_gpu, 2))


def tokens(data: dict[str, Any], work: Work) -> int:
    """Sequence length of one transformer pass."""
    side = data["pixels_per_token"]
    per_frame = (work.width // side) * (work.height // side)
    if work.frames:
        frames = min(work.frames, data.get("frames_per_call", work.frames))
        latent_frames = math.ceil(frames / data["frames_per_latent"]) + data.get("extra_latent_frames", 0)
    else:
        latent_frames = 1
    condition = work.input_images * data.get("condition_tokens_per_image", 0)
    return per_frame * latent_frames + condition + data.get("joint_text_tokens", 0)


def _activations(data: dict[str, Any], work: Work, vae_tiling: bool) -> dict[str, float]:
    batch = 2 if work.guidance and data["cfg"] == "batched" else 1
    batch *= work.outputs if data.get("outputs") == "batched" else 1
    denoise = data["denoise"]["gib_per_ktoken"] * batch * tokens(data, work) / 1000
    decoded_mpx = min(work.megapixels, data["vae_tile_mpx"]) if vae_tiling else work.megapixels
    decode = data["decode"]["gib_per_mpx"] * decoded_mpx
    if work.frames:
        frames = work.frames  # the pipeline holds the whole decoded clip
        decode += frames * work.width * work.height * 3 * DECODED_BYTES_PER_VALUE / GIB
    return {"encode": data["encode_gib"]["value"], "denoise": denoise, "decode": decode}


def _on_gpu(parts: dict[str, dict[str, int]], mode: Mode, phase: str, ranks: int) -> float:
    """Weights on the GPU while ``phase`` runs, in GiB."""
    running = [k for k in parts if k in ENCODERS] if phase == "encode" else []
    running += ["transformer"] if phase == "denoise" else ["vae"] if phase == "decode" else []
    if mode is Mode.MODEL_OFFLOAD:
        # The encoders run one after another, each alone on the GPU.
        return max(parts[k]["bytes"] for k in running) / GIB
    if mode is Mode.GROUP_OFFLOAD:
        return max(_group_bytes(parts[k]) for k in running) / GIB
    if mode is Mode.TEXT_ENCODER_OFFLOAD:
        # The encoders come on for the encode phase, the rest stays.
        kept = parts if phase == "encode" else {k: v for k, v in parts.items() if k not in ENCODERS}
        return _sum(kept) / GIB
    if mode is Mode.FP8:
        return (_sum(parts) - _fp8_saved(parts)) / GIB
    if mode is Mode.SHARDED:
        return _sharded_bytes(parts, ranks) / GIB
    if mode is Mode.EXPERT_OFFLOAD:
        # The running expert and the VAE stay; the encoders join them for the encode phase.
        kept = parts if phase == "encode" else {k: v for k, v in parts.items() if k not in ENCODERS}
        return _sum(_one_expert(kept)) / GIB
    return _sum(parts) / GIB


def _fp8_saved(parts: dict[str, dict[str, int]]) -> float:
    """Bytes FP8 saves: half of every transformer's (each expert's) linear weights."""
    return sum(parts[k]["linear_weight_bytes"] / 2 for k in ("transformer", SECOND_EXPERT) if k in parts)


def has_experts(model: str) -> bool:
    """The model has two experts (expert offload applies to it)."""
    return SECOND_EXPERT in weights()[model]


def _one_expert(parts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """``parts`` with only one expert: the two are the same size, so which one does not matter."""
    return {k: v for k, v in parts.items() if k != SECOND_EXPERT}


def _group_bytes(part: dict[str, int]) -> int:
    """Block-level group offload: what is not in a repeated block, plus two blocks (the one
    running and the next, prefetched on a CUDA stream)."""
    return part["bytes"] - part["block_bytes"] + 2 * part["largest_block_bytes"]


def _sharded_bytes(parts: dict[str, dict[str, int]], ranks: int) -> int:
    """A rank of the FSDP group: its share of the transformer (both experts of a two-expert
    model) and of the text encoder, plus two blocks gathered whole (the one running and the next),
    plus the VAE and other encoders whole.

    The official code reads each DiT with ``from_pretrained`` and no dtype, so FSDP shards it in
    float32 (upstream's ``generate.py --dit_fsdp`` does the same) and gathers each block in
    bfloat16 (its ``MixedPrecision``); the text encoder is read in bfloat16."""
    dits = [k for k in ("transformer", SECOND_EXPERT) if k in parts]
    sharded = (
        sum(parts[k]["params"] * FSDP_DIT_BYTES_PER_PARAM for k in dits) + parts["text_encoder"]["bytes"]
    )
    whole = _sum({k: v for k, v in parts.items() if k not in (*dits, "text_encoder")})
    return sharded // ranks + 2 * parts["transformer"]["largest_block_bytes"] + whole


def _sum(parts: dict[str, dict[str, int]]) -> int:
    return sum(part["bytes"] for part in parts.values())

"""The model catalog: every model the fleet knows, what it does, where it runs, what it accepts.

Where it runs is ``placements``: per class, how its weights are placed on the GPU. What a request
needs in that placement is the memory model's (``routing.memory``: weights counted from the real
configurations, activations measured or estimated per request), never a figure written here. Size
multiples are what each pipeline accepts: the VAE's spatial compression times the transformer's
patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from routing.classes import VramClass
from routing.memory.model import Mode, Placement


class TaskKind(StrEnum):
    TEXT_TO_IMAGE = "text-to-image"
    EDIT = "edit"
    TEXT_TO_VIDEO = "text-to-video"
    IMAGE_TO_VIDEO = "image-to-video"
    ANIMATE = "animate"
    SPEECH_TO_VIDEO = "speech-to-video"


@dataclass(frozen=True)
class SizeLimits:
    default_width: int
    default_height: int
    multiple_of: int
    min_side: int
    max_side: int
    max_pixels: int


@dataclass(frozen=True)
class VideoLimits:
    default_frames: int
    max_frames: int
    # Valid frame counts are k * frames_step + frames_offset: Wan's VAE compresses time by 4,
    # so its counts are 4k+1; S2V generates whole clips of 80 frames.
    frames_step: int
    fps: int
    frames_offset: int = 1


@dataclass(frozen=True)
class SpeedProfile:
    """How a worker of one class runs a model fast: regional compilation of the transformer's
    repeated blocks (at load, then warmed on ``warm_sizes`` before the worker takes a job) and
    the attention backends to try, fastest first (the first one present on the device is used;
    ``native``, PyTorch's SDPA, always is)."""

    compile: bool = True
    # (width, height, frames or 0) the class mostly runs; two or more sizes make the compiled
    # blocks shape-dynamic, so a size not listed runs without compiling again. Dynamo makes
    # dynamic only the dimensions that changed between the first size and the next, so the first
    # two differ in width, height and (video) frames: a dimension the same in both stays a
    # constant of the graphs, and the first job that changes it compiles again.
    warm_sizes: tuple[tuple[int, int, int], ...] = ()
    attention: tuple[str, ...] = ("_flash_3", "flash", "_native_cudnn", "native")
    # FP8 linear layers (torchao) and CUDA graphs for the compiled blocks: off until a GPU run of
    # bench/gpu_speed.py shows they win on the model (neither has been measured yet).
    fp8: bool = False
    cuda_graphs: bool = False
    # The text encoder's repeated layers compiled too (with the transformer, warmed on the same
    # jobs): off until a GPU run shows it wins on the model (not measured yet).
    compile_text_encoder: bool = False
    # Query, key and value computed by one GEMM in base jobs (worker/fused.py; Wan's, Qwen-Image's
    # and Z-Image's attention): off until a GPU run shows it wins on the model (not measured yet).
    fused_qkv: bool = False
    # TF32 matmuls and convolutions for the float32 parts of the official Wan code the torchrun
    # group runs (the diffusers pipelines run bfloat16 throughout): off until measured.
    tf32: bool = False


@dataclass(frozen=True)
class Variant:
    """A step-distilled way to run a model, with the steps and guidance it was distilled for:
    either a published distillation LoRA kept loaded by the worker (copied into the LoRA slot for
    the variant's jobs), or a published distilled checkpoint of the transformer (``checkpoint``),
    kept loaded beside the model's and swapped into it for the variant's jobs."""

    key: str
    steps: int
    guidance: float
    lora_repo: str = ""  # hub repository of the LoRA
    lora_file: str = ""  # its weight file in that repository
    lora_scale: float = 1.0
    notes: str = ""
    # Models with two experts (Wan2.2-A14B): the low-noise expert's LoRA file in the same
    # repository; ``lora_file`` is then the high-noise expert's.
    lora_file_2: str | None = None
    # The scheduler configuration the variant was distilled with, as changes to the repository's
    # (``from_config`` keyword arguments); empty: the repository's scheduler as it is.
    scheduler: tuple[tuple[str, Any], ...] = ()
    # A full checkpoint instead of a LoRA: the hub repository (diffusers layout) whose
    # ``transformer/`` runs the variant's jobs in place of the model's, same architecture.
    checkpoint: str | None = None
    # Distribution-matching-distilled (DMD) sampling: the fixed timesteps of its steps (as many as
    # ``steps``, which a request cannot change); at each the model's prediction gives the clean
    # latents, noised afresh to the next timestep's level. Empty: the model's own sampler.
    dmd_timesteps: tuple[int, ...] = ()
    # The hub revision of its repository that `python -m worker.weights pull <model>:<variant>`
    # takes (``ModelSpec.revision`` says how a revision pins).
    revision: str = "main"

    @property
    def repo(self) -> str:
        """The hub repository of its weights: the checkpoint's, or the LoRA's."""
        return self.checkpoint or self.lora_repo

    @property
    def files(self) -> tuple[str, ...]:
        """Its files in that repository, as hub allow-patterns: the LoRA file(s), or the
        checkpoint's transformer (the rest of its repository is the model's own)."""
        if self.checkpoint is not None:
            return ("transformer/*",)
        return tuple(f for f in (self.lora_file, self.lora_file_2) if f)


@dataclass(frozen=True)
class HubFiles:
    """Files of another hub repository that a model's weights folder holds beside its own
    repository's: those ``patterns`` match (hub allow-patterns: ``*`` crosses ``/``), at their
    paths in that repository, from ``revision`` (``ModelSpec.revision`` says how it pins)."""

    hub_id: str
    patterns: tuple[str, ...]
    revision: str = "main"


# Wan-Animate's official preprocessing weights: a person detector and a whole-body pose model
# (ONNX) and SAM2, in the official repository's process_checkpoint (not in the diffusers one).
_ANIMATE_PREPROCESS = HubFiles(
    "Wan-AI/Wan2.2-Animate-14B",
    ("process_checkpoint/det/*", "process_checkpoint/pose2d/*", "process_checkpoint/sam2/*"),
)


# Module paths a LoRA may target, per transformer family (after prefixes such as
# "transformer." or "diffusion_model." are taken off). A LoRA's tensor names are matched against
# them at submit; the worker puts its LoRA slot on the linear layers they name.
_ZIMAGE_LORA = r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)"
# Omni-Base adds refiner blocks for its SigLIP image features.
_ZIMAGE_OMNI_LORA = _ZIMAGE_LORA.replace("context_refiner)", "context_refiner|siglip_refiner)")
_QWEN_LORA = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|(img|txt)_mlp\.net\.(0\.proj|2)|(img|txt)_mod\.1)"
)
# Wan's own names (self_attn.q, ffn.0) are what most published Wan LoRAs use; diffusers renames them.
_WAN_5B_LORA = (
    r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2)"
    r"|(self_attn|cross_attn)\.(q|k|v|o)|ffn\.[02])"
)
# Both A14B experts have the 5B's block layout (no image tokens, even for image-to-video).
_WAN_A14B_LORA = _WAN_5B_LORA
_WAN_14B_I2V_LORA = (
    r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|attn2\.(add_k_proj|add_v_proj)|ffn\.net\.(0\.proj|2)"
    r"|(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)|ffn\.[02])"
)

_QWEN_LIGHTNING = "lightx2v/Qwen-Image-Lightning"
# The scheduler the Qwen-Image-Lightning LoRAs were distilled with (their repository's diffusers
# example): the models' FlowMatchEulerDiscreteScheduler at a fixed shift of 3 (mu = log 3 at
# every image size) and without the repository's terminal shift (0.02).
_QWEN_LIGHTNING_SCHEDULER = (
    ("base_shift", math.log(3)),
    ("max_shift", math.log(3)),
    ("shift_terminal", None),
)


def _qwen_lightning(steps: int, lora_file: str) -> Variant:
    """A Qwen-Image-Lightning variant: ``steps`` steps without guidance, at its scheduler."""
    return Variant(
        f"lightning-{steps}", steps, 1.0, _QWEN_LIGHTNING, lora_file, scheduler=_QWEN_LIGHTNING_SCHEDULER
    )


_WAN_LIGHTNING = "lightx2v/Wan2.2-Lightning"


@dataclass(frozen=True)
class ModelSpec:
    key: str
    task_kinds: tuple[TaskKind, ...]
    vram_class: VramClass  # its home class: where its default request goes
    pipeline: str  # the class that runs it (diffusers pipeline, or the official code's)
    hub_id: str
    size: SizeLimits
    default_steps: int
    max_steps: int
    default_guidance: float
    max_prompt_chars: int
    video: VideoLimits | None = None
    max_input_images: int = 0
    # Only these (width, height) pairs, when the model's code has a fixed list.
    allowed_sizes: tuple[tuple[int, int], ...] = ()
    # How each class that runs the model places it (routing.memory.Mode); a request goes to the
    # smallest class whose card holds its predicted peak in that placement. Empty: resident on
    # the home class and every bigger one.
    placements: dict[VramClass, Placement] = field(default_factory=dict)
    # Step-caching methods (``cache.method`` of a request) that diffusers' cache hooks run on
    # this model's transformer and pipeline; empty: requests with a cache are refused.
    cache_methods: tuple[str, ...] = ()
    # False while the fleet has no adapter that really runs the model: such a model is listed
    # (so callers can plan) but refused at submit with a message that says so.
    served: bool = False
    notes: str = ""
    # The speed profile per class that runs the model (a class not listed runs it eager).
    speed: dict[VramClass, SpeedProfile] = field(default_factory=dict)
    # Regex of the transformer modules a LoRA may target; None: the model takes no LoRAs.
    lora_modules: str | None = None
    variants: dict[str, Variant] = field(default_factory=dict)
    # Wan2.2-A14B's mixture of experts: ``transformer`` denoises timesteps at or above
    # ``boundary_ratio`` x 1000, ``transformer_2`` the rest. None: one transformer.
    boundary_ratio: float | None = None
    # The low-noise expert's guidance when a request gives no ``guidance_scale_2``.
    default_guidance_2: float | None = None
    # The hub revision `python -m worker.weights pull` downloads, and the folder of the object
    # store its mirror lives in (weights/<key>/<revision>/). A commit id pins the files in code: a
    # pull asks the hub for exactly it and a mirror of another commit is refused. A branch name
    # is resolved by the pull, whose commit the mirror's manifest records; the mirror then holds
    # those files until it is replaced on purpose (`mirror --replace`): a branch that moves on
    # upstream changes no node's files (worker.weights).
    revision: str = "main"
    # Files of other repositories the model's folder holds too (Animate's preprocessing weights):
    # pulled, mirrored and filled with the model's own, each repository at its revision.
    extra_files: tuple[HubFiles, ...] = ()
    # Takes the Z-Image pipelines' CFG options (``cfg_normalization``, ``cfg_truncation``).
    cfg_options: bool = False
    # False while the model's makers have not published it: refused at submit saying so.
    released: bool = True
    # Where the torchrun group (a sharded placement) runs the official code on another repository
    # than ``hub_id``: that checkpoint. None: ``hub_id`` is what every class loads.
    official: OfficialCheckpoint | None = None
    # The repository files its weights folder holds, as hub allow-patterns; empty: those its
    # pipeline loads (worker.weights.files.patterns). A variant's weights (``variant_spec``) name theirs.
    weights_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class OfficialCheckpoint:
    """The official Wan2.2 code's checkpoint of a model whose ``hub_id`` is the diffusers one: what
    the h100x8 class's torchrun group loads (``checkpoint_spec``), from another repository."""

    task: str  # the official code's task (``wan.configs.WAN_CONFIGS``), e.g. "t2v-A14B"
    hub_id: str
    revision: str = "main"


# The scheduler the Wan2.2-Lightning LoRAs were distilled with: the repository's UniPC at flow
# shift 5, first order and without its corrector at any step (a request has at most 100), which
# makes each step an Euler step in flow matching: 4 steps land on timesteps 999, 937, 833 and 625.
_WAN_LIGHTNING_SCHEDULER = (
    ("flow_shift", 5.0),
    ("solver_order", 1),
    ("disable_corrector", tuple(range(100))),
)


def _wan_lightning(folder: str) -> Variant:
    """A Wan2.2-Lightning 4-step variant of an A14B model: one LoRA per expert in ``folder`` of the
    repository, run at the scheduler they were distilled with."""
    return Variant(
        "lightning-4",
        4,
        1.0,
        _WAN_LIGHTNING,
        f"{folder}/high_noise_model.safetensors",
        lora_file_2=f"{folder}/low_noise_model.safetensors",
        scheduler=_WAN_LIGHTNING_SCHEDULER,
    )


def _variants(*variants: Variant) -> dict[str, Variant]:
    return {variant.key: variant for variant in variants}


_RESIDENT = Placement(Mode.RESIDENT)
# A single-GPU model on an 80 GB card, or on rank 0's GPU of an h100x8 worker: resident.
_RESIDENT_80 = {VramClass.GPU80: _RESIDENT, VramClass.H100X8: _RESIDENT}


# First-block cache and TaylorSeer hook the transformer blocks diffusers registers for Qwen-Image and
# Wan, and need the pipeline to name its cond/uncond passes (``cache_context``); ZImagePipeline
# does not, so Z-Image has none.
_CACHED = ("first_block", "taylorseer")

# The Z-Image family: offloaded on gpu16, so eager there as TI2V-5B is (compiled blocks would
# move on and off the GPU every call); resident on gpu80, compiled and warmed at the common sizes.
_ZIMAGE_WARM = ((1024, 1024, 0), (768, 1344, 0), (1344, 768, 0))
_ZIMAGE_SPEED = {
    VramClass.GPU16: SpeedProfile(compile=False),
    VramClass.GPU80: SpeedProfile(warm_sizes=_ZIMAGE_WARM),
}
# The Z-Image family's 6B transformer (11.5 GiB) and Qwen3-4B text encoder (7.5 GiB) do not fit
# a 16 GiB card together: there, one component at a time; on gpu80, resident.
_ZIMAGE_PLACEMENTS = {VramClass.GPU16: Placement(Mode.MODEL_OFFLOAD), **_RESIDENT_80}

_IMAGE_SIZE_16 = SizeLimits(1024, 1024, multiple_of=16, min_side=64, max_side=2048, max_pixels=2048 * 2048)

# Wan2.2-A14B: the model cards' 480p and 720p (landscape or portrait) in multiples of 16 (the
# Wan2.1 VAE's 8x times 2x2 patches), 81 frames by default at 16 fps, 4k+1 as the VAE compresses
# time by 4. Longer clips up to 241 frames (15 s): by the memory model the 80 GB class holds every
# 480p clip and 720p ones up to 177 frames; 181 to 241 frames at 720p go to the group, which
# holds them at 25 GiB a rank. 241 is the catalog's cap, not memory's (the group would hold
# about 1,900 frames at 720p): a step's attention grows with the square of the frames.
_A14B_SIZE = SizeLimits(1280, 720, multiple_of=16, min_side=64, max_side=1280, max_pixels=1280 * 720)
_A14B_VIDEO = VideoLimits(default_frames=81, max_frames=241, frames_step=4, fps=16)
_A14B_PLACEMENT = (
    "two 14B experts (high-noise, then low-noise past the boundary timestep); on the 80 GB class "
    "the text encoder is offloaded after encoding and the idle expert is kept off the GPU until "
    "its first step (placement mode expert-offload); on the 8xH100 class the official code's "
    "task in the resident torchrun group, both experts and the text encoder sharded over the "
    "eight GPUs (FSDP) and each step's tokens split over them (Ulysses): clips the 80 GB class "
    "does not hold; LoRAs and variants run on the 80 GB class only"
)
_A14B_PLACEMENTS = {
    VramClass.GPU80: Placement(Mode.EXPERT_OFFLOAD),
    VramClass.H100X8: Placement(Mode.SHARDED),
}

CATALOG: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in [
        ModelSpec(
            key="z-image-turbo",
            task_kinds=(TaskKind.TEXT_TO_IMAGE,),
            vram_class=VramClass.GPU16,
            pipeline="diffusers.ZImagePipeline",
            hub_id="Tongyi-MAI/Z-Image-Turbo",
            placements=_ZIMAGE_PLACEMENTS,
            size=_IMAGE_SIZE_16,
            # Distilled for 8 function evaluations without guidance. diffusers' ZImagePipeline (since
            # 0.36) runs one transformer call per step, so that is 8 steps.
            default_steps=8,
            max_steps=50,
            default_guidance=0.0,
            max_prompt_chars=2000,
            served=True,
            speed=_ZIMAGE_SPEED,
            lora_modules=_ZIMAGE_LORA,
        ),
        ModelSpec(
            key="z-image",
            task_kinds=(TaskKind.TEXT_TO_IMAGE,),
            vram_class=VramClass.GPU16,
            pipeline="diffusers.ZImagePipeline",
            hub_id="Tongyi-MAI/Z-Image",
            # Guidance runs the transformer on a batch of two (prompt and negative prompt): the
            # predicted peak of a large request outgrows gpu16 sooner than Turbo's does.
            placements=_ZIMAGE_PLACEMENTS,
            size=_IMAGE_SIZE_16,
            # The model card: 28 to 50 steps, guidance 3 to 5, negative prompts.
            default_steps=50,
            max_steps=50,
            default_guidance=4.0,
            max_prompt_chars=2000,
            notes="the undistilled base: classifier-free guidance, negative prompts; most LoRAs are trained on it",
            served=True,
            speed=_ZIMAGE_SPEED,
            lora_modules=_ZIMAGE_LORA,
            cfg_options=True,
        ),
        ModelSpec(
            key="z-image-omni-base",
            task_kinds=(TaskKind.TEXT_TO_IMAGE, TaskKind.EDIT),
            vram_class=VramClass.GPU16,
            pipeline="diffusers.ZImageOmniPipeline",
            hub_id="Tongyi-MAI/Z-Image-Omni-Base",
            # As z-image, plus the SigLIP2 vision encoder; each input image's SigLIP2 and latent
            # tokens join every pass, and the predicted peak counts them.
            placements=_ZIMAGE_PLACEMENTS,
            size=_IMAGE_SIZE_16,
            default_steps=50,
            max_steps=50,
            default_guidance=4.0,
            max_prompt_chars=2000,
            # The pipeline takes any number; each image (scaled to at most one megapixel) adds
            # its tokens to every step, so the fleet takes up to four.
            max_input_images=4,
            notes="generates, or edits from 1-4 input images (the output follows the last one's size)",
            served=True,
            speed=_ZIMAGE_SPEED,
            lora_modules=_ZIMAGE_OMNI_LORA,
            cfg_options=True,
        ),
        ModelSpec(
            key="z-image-edit",
            task_kinds=(TaskKind.EDIT,),
            vram_class=VramClass.GPU16,
            pipeline="not released",
            hub_id="Tongyi-MAI/Z-Image-Edit",
            # Placed as the base, a placeholder until the model and its card ship (no memory
            # figures: it is refused at submit).
            placements=_ZIMAGE_PLACEMENTS,
            size=_IMAGE_SIZE_16,
            default_steps=50,
            max_steps=50,
            default_guidance=4.0,
            max_prompt_chars=2000,
            max_input_images=1,
            notes="Z-Image fine-tuned for editing; announced, not released",
            released=False,
        ),
        ModelSpec(
            key="qwen-image",
            task_kinds=(TaskKind.TEXT_TO_IMAGE,),
            vram_class=VramClass.GPU80,
            pipeline="diffusers.QwenImagePipeline",
            hub_id="Qwen/Qwen-Image",
            placements=_RESIDENT_80,
            size=SizeLimits(1328, 1328, multiple_of=16, min_side=64, max_side=2048, max_pixels=2048 * 2048),
            default_steps=50,
            max_steps=100,
            default_guidance=4.0,
            max_prompt_chars=4000,
            cache_methods=_CACHED,
            served=True,
            speed={
                VramClass.GPU80: SpeedProfile(warm_sizes=((1328, 1328, 0), (1664, 928, 0), (928, 1664, 0)))
            },
            lora_modules=_QWEN_LORA,
            variants=_variants(
                _qwen_lightning(8, "Qwen-Image-Lightning-8steps-V1.1.safetensors"),
                _qwen_lightning(4, "Qwen-Image-Lightning-4steps-V1.0.safetensors"),
            ),
        ),
        ModelSpec(
            key="qwen-image-edit",
            task_kinds=(TaskKind.EDIT,),
            vram_class=VramClass.GPU80,
            pipeline="diffusers.QwenImageEditPipeline",
            hub_id="Qwen/Qwen-Image-Edit",
            placements=_RESIDENT_80,
            size=_IMAGE_SIZE_16,
            default_steps=50,
            max_steps=100,
            default_guidance=4.0,
            max_prompt_chars=4000,
            max_input_images=1,
            cache_methods=_CACHED,
            served=True,
            speed={VramClass.GPU80: SpeedProfile(warm_sizes=((1024, 1024, 0), (1184, 880, 0)))},
            lora_modules=_QWEN_LORA,
            variants=_variants(
                _qwen_lightning(8, "Qwen-Image-Edit-Lightning-8steps-V1.0.safetensors"),
                _qwen_lightning(4, "Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors"),
            ),
        ),
        ModelSpec(
            key="qwen-image-edit-2509",
            task_kinds=(TaskKind.EDIT,),
            vram_class=VramClass.GPU80,
            pipeline="diffusers.QwenImageEditPlusPipeline",
            hub_id="Qwen/Qwen-Image-Edit-2509",
            placements=_RESIDENT_80,
            size=_IMAGE_SIZE_16,
            default_steps=40,
            max_steps=100,
            default_guidance=4.0,
            max_prompt_chars=4000,
            max_input_images=3,
            notes="1-3 images: person + person, person + scene, person + object",
            cache_methods=_CACHED,
            served=True,
            speed={VramClass.GPU80: SpeedProfile(warm_sizes=((1024, 1024, 0), (1184, 880, 0)))},
            lora_modules=_QWEN_LORA,
            # Published in bf16 and fp32 only, in a folder of the repository.
            variants=_variants(
                _qwen_lightning(
                    8, "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"
                ),
                _qwen_lightning(
                    4, "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"
                ),
            ),
        ),
        ModelSpec(
            key="wan2.2-ti2v-5b",
            task_kinds=(TaskKind.TEXT_TO_VIDEO, TaskKind.IMAGE_TO_VIDEO),
            vram_class=VramClass.GPU16,
            pipeline="diffusers.WanPipeline / diffusers.WanImageToVideoPipeline",
            hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            # 9.3 GiB of transformer and 10.6 GiB of UMT5 encoder: one at a time on a 16 GiB
            # card, and the clip decoded in tiles.
            placements={VramClass.GPU16: Placement(Mode.MODEL_OFFLOAD, vae_tiling=True), **_RESIDENT_80},
            # 720p class; the Wan2.2 VAE compresses 16x and the DiT patches 2x2.
            size=SizeLimits(1280, 704, multiple_of=32, min_side=64, max_side=1280, max_pixels=1280 * 704),
            default_steps=50,
            max_steps=100,
            default_guidance=5.0,
            max_prompt_chars=2000,
            video=VideoLimits(default_frames=121, max_frames=241, frames_step=4, fps=24),
            max_input_images=1,
            notes="16 GB class with model offload and VAE tiling, 80 GB class resident",
            cache_methods=_CACHED,
            served=True,
            # Offloaded on gpu16: compiled blocks would be moved on and off the GPU every call,
            # so that class runs eager; resident on gpu80, compiled.
            speed={
                VramClass.GPU16: SpeedProfile(compile=False),
                # Portrait at 81 frames: with 121 frames in both, the frame count stayed a constant
                # and a job of any other length compiled (the warm-up's two sizes also had the
                # same token count, so the second did not compile a shape-dynamic graph at all).
                VramClass.GPU80: SpeedProfile(warm_sizes=((1280, 704, 121), (704, 1280, 81))),
            },
            lora_modules=_WAN_5B_LORA,
            variants=_variants(
                # FastVideo's DMD-distilled TI2V-5B (dense attention): 3 steps without guidance,
                # at the timesteps of its pipeline config.
                Variant(
                    "fastwan-3",
                    3,
                    1.0,
                    checkpoint="FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers",
                    dmd_timesteps=(1000, 757, 522),
                ),
            ),
        ),
        ModelSpec(
            key="wan2.2-t2v-a14b",
            task_kinds=(TaskKind.TEXT_TO_VIDEO,),
            vram_class=VramClass.GPU80,
            pipeline="diffusers.WanPipeline (transformer + transformer_2); h100x8: wan.WanT2V (official code)",
            hub_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
            # Both 14B experts (2 x 26 GiB in bf16) and the umT5-XXL encoder do not fit with a
            # 720p clip's activations: the worker (worker.adapters.wan.ExpertPlacement) keeps one
            # expert and the VAE on the GPU, the text encoder on it only while encoding.
            placements=_A14B_PLACEMENTS,
            size=_A14B_SIZE,
            default_steps=40,
            max_steps=100,
            # The model card's guidance: 4.0 for the high-noise expert, 3.0 for the low-noise one.
            default_guidance=4.0,
            default_guidance_2=3.0,
            boundary_ratio=0.875,
            max_prompt_chars=2000,
            video=_A14B_VIDEO,
            notes=_A14B_PLACEMENT,
            served=True,
            lora_modules=_WAN_A14B_LORA,
            variants=_variants(
                _wan_lightning("Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"),
            ),
            official=OfficialCheckpoint("t2v-A14B", "Wan-AI/Wan2.2-T2V-A14B"),
        ),
        ModelSpec(
            key="wan2.2-i2v-a14b",
            task_kinds=(TaskKind.IMAGE_TO_VIDEO,),
            vram_class=VramClass.GPU80,
            pipeline="diffusers.WanImageToVideoPipeline (transformer + transformer_2); h100x8: wan.WanI2V (official code)",
            hub_id="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
            placements=_A14B_PLACEMENTS,
            size=_A14B_SIZE,
            default_steps=40,
            max_steps=100,
            default_guidance=3.5,
            default_guidance_2=3.5,
            boundary_ratio=0.9,
            max_prompt_chars=2000,
            video=_A14B_VIDEO,
            max_input_images=1,
            notes=_A14B_PLACEMENT,
            served=True,
            lora_modules=_WAN_A14B_LORA,
            variants=_variants(
                _wan_lightning("Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1"),
            ),
            official=OfficialCheckpoint("i2v-A14B", "Wan-AI/Wan2.2-I2V-A14B"),
        ),
        ModelSpec(
            key="wan2.2-animate-14b",
            task_kinds=(TaskKind.ANIMATE,),
            vram_class=VramClass.GPU80,
            pipeline="diffusers.WanAnimatePipeline",
            hub_id="Wan-AI/Wan2.2-Animate-14B-Diffusers",
            placements=_RESIDENT_80,
            size=SizeLimits(1280, 720, multiple_of=16, min_side=64, max_side=1280, max_pixels=1280 * 720),
            default_steps=20,
            max_steps=50,
            default_guidance=1.0,
            max_prompt_chars=2000,
            video=VideoLimits(default_frames=77, max_frames=617, frames_step=4, fps=30),
            max_input_images=1,
            notes='modes "move" (character follows a driving video) and "mix" (character replaces one)',
            served=True,
            # A full 77-frame segment, and a short clip's 41-frame one (clips under 77 frames are
            # made in one segment of their own length): apart in every dimension.
            speed={VramClass.GPU80: SpeedProfile(warm_sizes=((1280, 720, 77), (720, 1280, 41)))},
            lora_modules=_WAN_14B_I2V_LORA,
            extra_files=(_ANIMATE_PREPROCESS,),
        ),
        ModelSpec(
            key="wan2.2-s2v-14b",
            task_kinds=(TaskKind.SPEECH_TO_VIDEO,),
            vram_class=VramClass.H100X8,
            pipeline="wan.WanS2V (official Wan2.2 code, torchrun, FSDP + Ulysses)",
            hub_id="Wan-AI/Wan2.2-S2V-14B",
            placements={VramClass.H100X8: Placement(Mode.SHARDED)},
            size=SizeLimits(1024, 704, multiple_of=32, min_side=256, max_side=1280, max_pixels=1280 * 720),
            default_steps=40,
            max_steps=60,
            default_guidance=4.5,
            max_prompt_chars=2000,
            video=VideoLimits(default_frames=80, max_frames=80 * 10, frames_step=80, fps=16, frames_offset=0),
            max_input_images=1,
            # The official code's SUPPORTED_SIZES for s2v-14B.
            allowed_sizes=((1024, 704), (704, 1024), (832, 480), (480, 832), (1280, 720), (720, 1280)),
            served=True,
            notes="run by the official Wan2.2 code in a resident torchrun group (worker.group)",
            # The group's techniques (worker.adapters.official_group.GroupSpeed): SDPA's own
            # kernel choice (where flash-attn is not installed) and no TF32, until
            # bench/gpu_speed.py's S2V rows measure cuDNN attention and TF32 on a card.
            speed={VramClass.H100X8: SpeedProfile(compile=False, attention=("native",))},
        ),
    ]
}


def footprint_gb(spec: ModelSpec, vram_class: VramClass) -> float | None:
    """GPU memory (GiB) the model takes on one GPU of a worker of ``vram_class`` in the class's
    placement, at the largest request that class takes; None when it cannot run there. What
    the worker's pool budgets (``routing.memory.footprint_gb``)."""
    from routing.memory import footprint_gb as predicted

    return predicted(spec, vram_class)


# The suffix of an official checkpoint's key (``checkpoint_spec``).
OFFICIAL_SUFFIX = "-official"


def checkpoint_spec(spec: ModelSpec) -> ModelSpec:
    """The weights the torchrun group loads for ``spec``: its official checkpoint as a spec of its
    own (key ``<key>-official``, the official repository), so pulling, mirroring, the node cache
    and ``FLEET_MODEL_ROOT`` find it beside the diffusers weights; ``spec`` itself when every
    class loads ``hub_id``."""
    if spec.official is None:
        return spec
    from dataclasses import replace

    task_class = {"t2v": "WanT2V", "i2v": "WanI2V"}[spec.official.task.split("-")[0]]
    return replace(
        spec,
        key=spec.key + OFFICIAL_SUFFIX,
        hub_id=spec.official.hub_id,
        revision=spec.official.revision,
        pipeline=f"wan.{task_class} (official Wan2.2 code, task {spec.official.task})",
        official=None,
    )


# A variant's weights key: ``<model>:<variant>`` (the key FLEET_VARIANT_WEIGHTS takes too).
VARIANT_SEPARATOR = ":"


def variant_spec(spec: ModelSpec, name: str) -> ModelSpec:
    """The weights of ``spec``'s variant ``name`` as a spec of their own (key
    ``<model>:<variant>``, the variant's repository and revision, only its files), so pulling,
    mirroring, the node cache and ``FLEET_MODEL_ROOT`` find them as they find a model's."""
    from dataclasses import replace

    variant = spec.variants[name]
    return replace(
        spec,
        key=f"{spec.key}{VARIANT_SEPARATOR}{name}",
        hub_id=variant.repo,
        revision=variant.revision,
        weights_files=variant.files,
        variants={},
        extra_files=(),
        official=None,
    )


def weights_spec(key: str) -> ModelSpec:
    """The spec whose weights ``key`` names: a catalog model, an official checkpoint
    (``<key>-official``) or a variant (``<key>:<variant>``); KeyError names the known keys."""
    model, _, variant = key.partition(VARIANT_SEPARATOR)
    if variant and model in CATALOG and variant in CATALOG[model].variants:
        return variant_spec(CATALOG[model], variant)
    if key.endswith(OFFICIAL_SUFFIX) and key.removesuffix(OFFICIAL_SUFFIX) in CATALOG:
        spec = CATALOG[key.removesuffix(OFFICIAL_SUFFIX)]
        if spec.official is not None:
            return checkpoint_spec(spec)
    if key in CATALOG:
        return CATALOG[key]
    raise KeyError(f"no weights named {key!r}; known: {', '.join(weights_keys())}")


def weights_keys() -> list[str]:
    """Every model's weights key, each official checkpoint's and each variant's."""
    official = [key + OFFICIAL_SUFFIX for key, spec in CATALOG.items() if spec.official]
    variants = [f"{key}{VARIANT_SEPARATOR}{name}" for key, spec in CATALOG.items() for name in spec.variants]
    return sorted([*CATALOG, *official, *variants])


def get_model(key: str) -> ModelSpec:
    """The catalog entry for ``key``; KeyError names the known keys."""
    try:
        return CATALOG[key]
    except KeyError:
        raise KeyError(f"unknown model {key!r}; known models: {', '.join(sorted(CATALOG))}") from None

"""Small Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-2509.

All three real repos share one architecture (MMDiT transformer, 8x causal-conv VAE, Qwen2.5-VL
text encoder, Qwen2 tokenizer, flow-matching scheduler); the Edit repos add ``processor/``, a
Qwen2VLProcessor that feeds the input images to the text encoder's vision tower. Sizes follow
diffusers' own Qwen-Image pipeline tests, except where the real model's layout matters to the
pipeline: 16 latent channels, the 8x VAE (sizes in multiples of 16), the scheduler config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testkit.small_models.tokenizers import _CORPUS, qwen_tokenizer

VERSION = 1

# The pipelines cut the system prompt off the text encoder's output by token count
# (``prompt_template_encode_start_idx``): 34 tokens for text-to-image, 64 for the edits, as the real
# tokenizer splits them. The tokenizer below learns every word of these prompts whole, so it
# splits them into the same number of tokens and the cut lands where it does for the real model.
_SYSTEM_PROMPTS = {
    "text-to-image": (
        "Describe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:",
        34,
    ),
    "edit": (
        "Describe the key features of the input image (color, shape, size, texture, objects, "
        "background), then explain how the user's text instruction should alter or modify the image. "
        "Generate a new image that meets the user's requirements while maintaining consistency with "
        "the original input where appropriate.",
        64,
    ),
}

# Chat roles start a line in the template, so they are learnt as words without a leading space.
_VL_CORPUS = """\
system
user
assistant
Picture 1: Picture 2: Picture 3: Video 1:
make the sky blue and add a rainbow over the house
remove the car from the street and put a tree there
change the cat into a dog, keep the background the same
turn the photo into a watercolor painting
put the person from picture 1 next to the dog in picture 2
replace the text on the sign with "open"
"""

# The special tokens Qwen2.5-VL adds to Qwen2's <|endoftext|>, <|im_start|> and <|im_end|>. The
# vision ones are what the processor and the text encoder look for; the others keep the real set.
_VL_SPECIAL_TOKENS = [
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's chat template, trimmed to text, image and video parts (no tools). The pipelines
# format their prompts themselves; this is for anyone who calls apply_chat_template on the
# tokenizer or processor, and it writes images the way the Edit-2509 pipeline does
# ("Picture N: <|vision_start|><|image_pad|><|vision_end|>", with add_vision_id).
_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Vision input of the Edit processors: the real min_pixels, a far smaller max_pixels so each input
# image is at most 8x8 patches (16 tokens after the 2x2 merge) instead of hundreds.
_MIN_PIXELS = 56 * 56
_MAX_PIXELS = 112 * 112


def qwen_vl_tokenizer() -> Any:
    """A Qwen2.5-VL style ``Qwen2Tokenizer``: ``qwen_tokenizer`` retrained on prompt text plus the
    pipelines' system prompts, with the vision special tokens and the VL chat template."""
    base = qwen_tokenizer()
    corpus = _CORPUS.splitlines() + _VL_CORPUS.splitlines() + [p for p, _ in _SYSTEM_PROMPTS.values()]
    # Retraining keeps the base's normalizer, byte-level pre-tokenizer and decoder, so text splits
    # exactly as with the real Qwen2 tokenizer before BPE. The vocabulary cap is never reached:
    # training stops once every word of the corpus is one token.
    tokenizer = base.train_new_from_iterator(
        corpus, vocab_size=4096, new_special_tokens=_VL_SPECIAL_TOKENS, show_progress=False
    )
    tokenizer.chat_template = _VL_CHAT_TEMPLATE

    for name, (system, expected) in _SYSTEM_PROMPTS.items():
        prefix = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
        count = len(tokenizer(prefix).input_ids)
        if count != expected:
            raise RuntimeError(f"{name} system prompt is {count} tokens, the pipeline drops {expected}")
    return tokenizer


def _components(tokenizer: Any) -> dict[str, Any]:
    """Transformer, VAE, text encoder and scheduler, seeded so every build writes the same weights."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_dim = 16
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16 * 4,  # 16 latent channels packed 2x2, as in the real model
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),  # sums to attention_head_dim
    )

    torch.manual_seed(0)
    # Three downsamples give the real 8x compression, so the pipelines ask for sizes in multiples
    # of 16 (8x VAE, 2x2 packing); the default latents_mean/std are the real model's statistics.
    # The Edit pipelines encode every input image at about one megapixel whatever the output
    # size, so the VAE is as thin as it goes: 8 channels throughout and no encoder res blocks
    # (the mid block's and the decoder's remain) encode 1024x1024 in ~0.5 s on 2 cores, against
    # ~1.6 s for diffusers' test sizes.
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        temperal_downsample=[False, True, True],
    )

    def token_id(token: str) -> int:
        return tokenizer.convert_tokens_to_ids(token)

    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": text_dim,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 2048,
                # Multimodal RoPE: sections sum to half the head dim (8 / 2).
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": [1, 1, 2],
                    "rope_theta": 1000000.0,
                },
                "bos_token_id": token_id("<|endoftext|>"),
                "eos_token_id": token_id("<|im_end|>"),
                "pad_token_id": token_id("<|endoftext|>"),
            },
            vision_config={
                "depth": 2,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": text_dim,
                "fullatt_block_indexes": [1],  # the real tower alternates windowed and full attention
            },
            image_token_id=token_id("<|image_pad|>"),
            video_token_id=token_id("<|video_pad|>"),
            vision_start_token_id=token_id("<|vision_start|>"),
            vision_end_token_id=token_id("<|vision_end|>"),
        )
    ).eval()

    # The real Qwen-Image scheduler config: resolution-dependent exponential shift, stretched so
    # the last sigma is 0.02.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def _save_processor(tokenizer: Any, out: Path) -> None:
    """Write a Qwen2VLProcessor folder in the real repos' layout: tokenizer files, the image
    processor's preprocessor_config.json and a video_preprocessor_config.json.

    Written piece by piece because transformers 5 only builds a Qwen2VLProcessor together with its
    video processor, which needs torchvision (no CPU build of it here). transformers 5 still reads
    this per-part layout; without torchvision worker.adapters.qwen_image loads it image-only.
    """
    from transformers import Qwen2VLImageProcessorPil

    out.mkdir(parents=True)
    tokenizer.save_pretrained(out)
    # Saved under the backend-neutral type "Qwen2VLImageProcessor", as in the real repos, so
    # AutoImageProcessor picks the torchvision backend where it is installed.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS)
    image_processor.save_pretrained(out)
    config = json.loads((out / "preprocessor_config.json").read_text())

    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": config["image_mean"],
        "image_std": config["image_std"],
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2) + "\n"
    )


def _build(out: Path, pipeline_class: str, with_processor: bool) -> None:
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    tokenizer = qwen_vl_tokenizer()
    components = _components(tokenizer)
    if with_processor:
        # Saved beside the pipeline (see _save_processor); the pipeline is written without it and
        # model_index.json then names the real class, as in the hub repos.
        components["processor"] = None
    pipe = getattr(diffusers, pipeline_class)(**components)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # it warns that it cannot save the missing processor
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if with_processor:
        _save_processor(tokenizer, out / "processor")
        index_path = out / "model_index.json"
        index = json.loads(index_path.read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_qwen_image(out: Path) -> None:
    """Tiny Qwen/Qwen-Image (text to image)."""
    _build(out, "QwenImagePipeline", with_processor=False)


def build_qwen_image_edit(out: Path) -> None:
    """Tiny Qwen/Qwen-Image-Edit (one input image)."""
    _build(out, "QwenImageEditPipeline", with_processor=True)


def build_qwen_image_edit_2509(out: Path) -> None:
    """Tiny Qwen/Qwen-Image-Edit-2509 (one to three input images)."""
    _build(out, "QwenImageEditPlusPipeline", with_processor=True)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "qwen-image": build_qwen_image,
    "qwen-image-edit": build_qwen_image_edit,
    "qwen-image-edit-2509": build_qwen_image_edit_2509,
}

"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-2509 through diffusers' Qwen-Image pipelines.

All three run true classifier-free guidance: the request's ``guidance_scale`` is the pipelines'
``true_cfg_scale``, which only takes effect with a negative prompt, so one is supplied (" ", as
the model cards do) when the caller gave none. Their ``guidance_scale`` argument is for
guidance-distilled checkpoints, which these are not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from routing.catalog import ModelSpec
from routing.schemas import EditRequest, TextToImageRequest
from worker.adapters.base import (
    Adapter,
    Capabilities,
    Images,
    Inputs,
    Runtime,
    StepCallback,
    output_seeds,
    per_output,
    seeded_generator,
    step_cache,
    step_callback_for,
    variant_scheduler,
)

if TYPE_CHECKING:
    from PIL import Image


class QwenImageAdapter(Adapter):
    capabilities = Capabilities(loras=True, step_cache=True, compile=True, warm_up=True)

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        super().__init__(spec, weights, runtime)
        self.pipe = runtime.load("QwenImagePipeline", weights)

    @property
    def pipeline(self) -> Any:
        return self.pipe

    def run(self, request: TextToImageRequest, inputs: Inputs, on_step: StepCallback) -> Images:
        # 1. Check inputs: the catalog validated the request at submit; the pipeline must agree on
        #    the size multiple (it would silently round the size down), or the catalog is wrong.
        _check_size(self.pipe, request.width, request.height)

        # 2. Seeds, one per output: drawn here when the caller gave none, and reported so each
        #    image can be redone alone.
        seeds = output_seeds(request.seed, request.num_outputs)

        # 3. Denoise and decode, one call per output, with the request's step cache if any (and a
        #    variant's scheduler).
        images = []
        with (
            step_cache(self.pipe.transformer, request.cache) as cache,
            variant_scheduler(self.pipe, self.spec, request),
        ):
            for generator, callback in per_output(seeds, on_step):
                output = self.pipe(
                    prompt=request.prompt,
                    negative_prompt=_negative_prompt(request),
                    true_cfg_scale=request.guidance_scale,
                    width=request.width,
                    height=request.height,
                    num_inference_steps=request.steps,
                    generator=generator,
                    callback_on_step_end=callback,
                )
                images += output.images
        return Images(images, seed=seeds[0], seeds=seeds, cache=cache)


class QwenImageEditAdapter(Adapter):
    """Edits exactly one image."""

    # Warmed with a grey image of each warm size.
    capabilities = Capabilities(loras=True, step_cache=True, compile=True, warm_up=True)
    pipeline_class = "QwenImageEditPipeline"
    min_images = 1
    max_images = 1

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        super().__init__(spec, weights, runtime)
        self.pipe = runtime.load(self.pipeline_class, weights, **_processor_without_torchvision(weights))

    @property
    def pipeline(self) -> Any:
        return self.pipe

    def run(self, request: EditRequest, inputs: Inputs, on_step: StepCallback) -> Images:
        # 1. Check inputs. Without width and height the pipeline picks about one megapixel at the
        #    input image's aspect ratio (Edit-2509: the last image's), in multiples of 32.
        images = self._images(inputs)
        if (request.width is None) != (request.height is None):
            raise ValueError("give both width and height, or neither to follow the input image")
        if request.width is not None:
            _check_size(self.pipe, request.width, request.height)

        # 2. Seed: drawn here when the caller gave none, and reported so the image can be redone.
        seed, generator = seeded_generator(request.seed)

        # 3. Encode the images (vision tower and VAE), denoise and decode (a variant: at its
        #    scheduler).
        with (
            step_cache(self.pipe.transformer, request.cache) as cache,
            variant_scheduler(self.pipe, self.spec, request),
        ):
            output = self.pipe(
                image=images[0] if self.max_images == 1 else images,
                prompt=request.prompt,
                negative_prompt=_negative_prompt(request),
                true_cfg_scale=request.guidance_scale,
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                generator=generator,
                callback_on_step_end=step_callback_for(on_step),
            )
        return Images(list(output.images), seed=seed, cache=cache)

    def _images(self, inputs: Inputs) -> list[Image.Image]:
        images = list(inputs.get("images") or [])
        if not self.min_images <= len(images) <= self.max_images:
            wanted = (
                f"exactly {self.max_images} image"
                if self.min_images == self.max_images
                else f"{self.min_images} to {self.max_images} images"
            )
            hint = "; qwen-image-edit-2509 combines up to 3" if self.max_images == 1 else ""
            raise ValueError(
                f"{self.spec.key} edits {wanted} (got {len(images)}): send them in `images`{hint}"
            )
        # The VAE takes 3 channels; an RGBA or greyscale upload would fail deep in the pipeline.
        return [image if image.mode == "RGB" else image.convert("RGB") for image in images]


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Edits or combines one to three images (person + person, person + scene, person + object)."""

    pipeline_class = "QwenImageEditPlusPipeline"
    min_images = 1
    max_images = 3


def _check_size(pipe: Any, width: int, height: int) -> None:
    multiple = pipe.vae_scale_factor * 2
    if width % multiple or height % multiple:
        raise ValueError(f"these weights need sizes in multiples of {multiple}")


def _negative_prompt(request: Any) -> str | None:
    # True CFG needs a negative prompt; " " is the model cards' default. Without CFG a negative
    # prompt is unused and the pipeline would only warn about it.
    if request.guidance_scale > 1:
        return request.negative_prompt or " "
    return None


def _processor_without_torchvision(weights: str) -> dict[str, Any]:
    """The Edit pipelines' ``processor``, loaded here where torchvision is missing.

    transformers 5 builds a Qwen2VLProcessor only together with its video processor, which needs
    torchvision, so without it ``from_pretrained`` fails on ``processor/``. The pipelines pass only
    images, so a Qwen2VLProcessor without the video part does the same work: load it from the same
    files and hand it to ``from_pretrained``. With torchvision, diffusers loads the real one.
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return {}
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

    return {"processor": ImageOnlyQwen2VLProcessor.from_pretrained(weights, subfolder="processor")}

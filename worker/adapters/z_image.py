"""The Z-Image family through diffusers: Z-Image-Turbo and Z-Image (``ZImagePipeline``), and
Z-Image-Omni-Base (``ZImageOmniPipeline``), which also edits from input images.

Guidance: the pipelines run classifier-free guidance whenever ``guidance_scale`` is above 0
(Turbo's is 0: distilled without it), with the negative prompt, or an empty one, as the
unconditional side, and take the CFG options (``cfg_normalization``, ``cfg_truncation``) the
request carries for the models whose catalog entry has them.
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
    step_callback_for,
)

if TYPE_CHECKING:
    from PIL import Image


class ZImageAdapter(Adapter):
    """Z-Image-Turbo and Z-Image: text to image."""

    # No step caching: ZImagePipeline does not name its cond/uncond passes (see the catalog).
    capabilities = Capabilities(loras=True, compile=True, warm_up=True)
    pipeline_class = "ZImagePipeline"

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        super().__init__(spec, weights, runtime)
        self.pipe = runtime.load(self.pipeline_class, weights)

    @property
    def pipeline(self) -> Any:
        return self.pipe

    def run(self, request: TextToImageRequest, inputs: Inputs, on_step: StepCallback) -> Images:
        # 1. Check inputs: the request was validated against the catalog at submit; the pipeline
        #    itself must agree on the size multiple, or the catalog is wrong for these weights.
        _check_size(self.pipe, request.width, request.height)

        # 2. Seeds, one per output: drawn here when the caller gave none, and reported so each
        #    image can be redone alone.
        seeds = output_seeds(request.seed, request.num_outputs)

        # 3. Denoise and decode, one call per output.
        images = []
        for generator, callback in per_output(seeds, on_step):
            output = self.pipe(
                prompt=request.prompt,
                width=request.width,
                height=request.height,
                generator=generator,
                callback_on_step_end=callback,
                **_sampling(request),
            )
            images += output.images
        return Images(images, seed=seeds[0], seeds=seeds)


class ZImageOmniAdapter(ZImageAdapter):
    """Z-Image-Omni-Base: text to image, or an image made from one to ``max_input_images`` input
    images and the prompt (each image is seen twice: VAE latents and SigLIP2 features)."""

    pipeline_class = "ZImageOmniPipeline"

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        super().__init__(spec, weights, runtime)
        _encode_in_vae_dtype(self.pipe.vae)

    def run(self, request: TextToImageRequest | EditRequest, inputs: Inputs, on_step: StepCallback) -> Images:
        if not isinstance(request, EditRequest):
            return super().run(request, inputs, on_step)

        # 1. Check inputs. Without width and height the pipeline follows the last image: its
        #    size (scaled down to one megapixel when bigger), cut to multiples of 16.
        images = self._images(inputs)
        if (request.width is None) != (request.height is None):
            raise ValueError("give both width and height, or neither to follow the last input image")
        if request.width is not None:
            _check_size(self.pipe, request.width, request.height)

        # 2. Seed: drawn here when the caller gave none, and reported so the image can be redone.
        seed, generator = seeded_generator(request.seed)

        # 3. Encode the images (VAE and SigLIP2), denoise and decode.
        output = self.pipe(
            image=images,
            prompt=request.prompt,
            width=request.width,
            height=request.height,
            generator=generator,
            callback_on_step_end=step_callback_for(on_step),
            **_sampling(request),
        )
        return Images(list(output.images), seed=seed)

    def _images(self, inputs: Inputs) -> list[Image.Image]:
        images = list(inputs.get("images") or [])
        most = self.spec.max_input_images
        if not 1 <= len(images) <= most:
            raise ValueError(
                f"{self.spec.key} edits 1 to {most} images (got {len(images)}): send them in `images`"
            )
        # The VAE takes 3 channels; an RGBA or greyscale upload would fail deep in the pipeline.
        return [image if image.mode == "RGB" else image.convert("RGB") for image in images]


def _sampling(request: TextToImageRequest | EditRequest) -> dict[str, Any]:
    """Steps, guidance and its options as the pipelines take them. The CFG options are None for
    models without them (Turbo): the pipelines' defaults then apply, and with guidance 0 they
    are never read."""
    options = {
        "cfg_normalization": request.cfg_normalization,
        "cfg_truncation": request.cfg_truncation,
    }
    return {
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "negative_prompt": request.negative_prompt,
        **{name: value for name, value in options.items() if value is not None},
    }


def _check_size(pipe: Any, width: int, height: int) -> None:
    multiple = pipe.vae_scale_factor * 2
    if width % multiple or height % multiple:
        raise ValueError(f"these weights need sizes in multiples of {multiple}")


def _encode_in_vae_dtype(vae: Any) -> None:
    """ZImageOmniPipeline hands the VAE its input images in bfloat16 whatever the VAE's dtype.
    On a GPU (bfloat16 weights) that is what runs; a float32 VAE (the CPU) refuses the input.
    Cast it to the VAE's dtype on the way in, keeping the bfloat16 rounding the pipeline made."""
    encode = vae.encode

    def encode_in_dtype(images: Any, *args: Any, **kwargs: Any) -> Any:
        return encode(images.to(vae.dtype), *args, **kwargs)

    vae.encode = encode_in_dtype

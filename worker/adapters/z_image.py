"""Z-Image-Turbo through diffusers' ``ZImagePipeline``."""

from __future__ import annotations

from typing import Any

from routing.catalog import ModelSpec
from routing.schemas import TextToImageRequest
from worker.adapters.base import (
    Adapter,
    Capabilities,
    Images,
    Inputs,
    Runtime,
    StepCallback,
    output_seeds,
    per_output,
)


class ZImageAdapter(Adapter):
    # No step caching: ZImagePipeline does not name its cond/uncond passes (see the catalog).
    capabilities = Capabilities(loras=True, compile=True, warm_up=True)

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        super().__init__(spec, weights, runtime)
        self.pipe = runtime.load("ZImagePipeline", weights)

    @property
    def pipeline(self) -> Any:
        return self.pipe

    def run(self, request: TextToImageRequest, inputs: Inputs, on_step: StepCallback) -> Images:
        # 1. Check inputs: the request was validated against the catalog at submit; the pipeline
        #    itself must agree on the size multiple, or the catalog is wrong for these weights.
        multiple = self.pipe.vae_scale_factor * 2
        if request.width % multiple or request.height % multiple:
            raise ValueError(f"these weights need sizes in multiples of {multiple}")

        # 2. Seeds, one per output: drawn here when the caller gave none, and reported so each
        #    image can be redone alone.
        seeds = output_seeds(request.seed, request.num_outputs)

        # 3. Denoise and decode, one call per output.
        images = []
        for generator, callback in per_output(seeds, on_step):
            output = self.pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=generator,
                callback_on_step_end=callback,
            )
            images += output.images
        return Images(images, seed=seeds[0], seeds=seeds)

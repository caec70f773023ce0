"""Z-Image-Turbo through diffusers' ``ZImagePipeline``."""

from __future__ import annotations

from routing.catalog import ModelSpec
from routing.schemas import TextToImageRequest
from worker.adapters.base import Generated, Inputs, Runtime, StepCallback, seeded_generator, step_callback_for


class ZImageAdapter:
    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        self.spec = spec
        self.runtime = runtime
        self.pipe = runtime.load("ZImagePipeline", weights)

    def run(self, request: TextToImageRequest, inputs: Inputs, on_step: StepCallback) -> Generated:
        # 1. Check inputs: the request was validated against the catalog at submit; the pipeline
        #    itself must agree on the size multiple, or the catalog is wrong for these weights.
        multiple = self.pipe.vae_scale_factor * 2
        if request.width % multiple or request.height % multiple:
            raise ValueError(f"these weights need sizes in multiples of {multiple}")

        # 2. Seed: drawn here when the caller gave none, and reported so the image can be redone.
        seed, generator = seeded_generator(request.seed)

        # 3. Denoise and decode.
        output = self.pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            generator=generator,
            callback_on_step_end=step_callback_for(on_step),
        )
        return Generated(images=list(output.images), seed=seed)

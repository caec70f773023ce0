"""Wan2.2 through diffusers: TI2V-5B (text-to-video and image-to-video), T2V-A14B and I2V-A14B
(two experts), and Animate-14B.

TI2V-5B is one set of weights for both kinds: ``WanPipeline`` for text-to-video, and
``WanImageToVideoPipeline`` over the very same modules for image-to-video. With the repo's
``expand_timesteps=True`` the i2v pipeline VAE-encodes the image as the first latent frame, keeps
that frame clean (timestep 0 for its tokens) while the rest is denoised, and needs no image encoder.

T2V-A14B and I2V-A14B run ``WanPipeline`` / ``WanImageToVideoPipeline`` with two 14B experts:
``transformer`` denoises the steps whose timestep is at or above ``boundary_ratio`` x 1000 (the
high-noise ones, layout and motion), ``transformer_2`` the rest (detail). See ``ExpertPlacement``
for where each part waits between its turns.

Animate-14B runs ``WanAnimatePipeline``: "move" is its ``animate`` mode (the character performs the
driving motion), "mix" its ``replace`` mode (the character replaces the person in the video).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routing.catalog import ModelSpec, TaskKind
from worker.adapters.base import (
    Adapter,
    Capabilities,
    Inputs,
    ProgressCallback,
    Runtime,
    StepCallback,
    Video,
    count_placing,
    seeded_generator,
    step_cache,
    step_callback_for,
    variant_scheduler,
)

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# Wan-Animate was trained on clips of 77 frames, each continuing from the last frame of the
# previous one; longer outputs are made of such segments.
ANIMATE_SEGMENT_FRAMES = 77
# Frames of the previous segment that condition the next; the pipeline allows 1 or 5.
ANIMATE_CONTINUATION_FRAMES = 1

_ANIMATE_MODES = {"move": "animate", "mix": "replace"}


def _to_pil_frames(video: np.ndarray) -> list[Image.Image]:
    """(frames, H, W, 3) floats in [0, 1] to PIL frames, refusing NaN.

    PIL output would silently turn NaN (e.g. a bfloat16 overflow) into black frames; a failed
    job says more than a black video.
    """
    import numpy as np
    from PIL import Image

    if not np.isfinite(video).all():
        raise RuntimeError("the pipeline produced NaN or infinite pixels")
    pixels = (video.clip(0.0, 1.0) * 255).round().astype(np.uint8)
    return [Image.fromarray(frame) for frame in pixels]


def _resized(frames: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """Frames at ``size`` (width, height); the same Lanczos resize the pipeline would do, done
    here so it does not log a warning on every job."""
    from PIL import Image

    return [f if f.size == size else f.resize(size, Image.Resampling.LANCZOS) for f in frames]


class WanTI2VAdapter(Adapter):
    """Wan2.2-TI2V-5B: text-to-video and image-to-video from one resident copy of the weights."""

    capabilities = Capabilities(loras=True, step_cache=True, compile=True, warm_up=True)

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        import diffusers

        super().__init__(spec, weights, runtime)
        # The same call loads the hub weights and the small local test models.
        self.t2v = diffusers.WanPipeline.from_pretrained(weights, dtype=runtime.dtype)
        if not self.t2v.config.expand_timesteps:
            raise ValueError(f"{weights} is not a TI2V model: its pipeline lacks expand_timesteps")
        # Built from the same module objects, so both kinds share one copy of the weights.
        # Not ``from_pipe``: it casts every module to one dtype (float32 unless told), which
        # would also cast the layers the transformer keeps in float32.
        self.i2v = diffusers.WanImageToVideoPipeline(
            **self.t2v.components,
            boundary_ratio=self.t2v.config.boundary_ratio,
            expand_timesteps=True,
        )
        for pipe in (self.t2v, self.i2v):
            runtime.finish(pipe)

    @property
    def pipeline(self) -> Any:
        return self.t2v  # i2v shares its transformer

    def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Video:
        image_to_video = request.kind == "image-to-video"
        pipe = self.i2v if image_to_video else self.t2v

        # 1. Check inputs (see checked_video_inputs).
        extra = checked_video_inputs(pipe, request, inputs, image_to_video)

        # 2. Seed: drawn here when the caller gave none, and reported so the video can be redone.
        seed, generator = seeded_generator(request.seed)

        # 3. Denoise and decode, with the request's step cache if any (a variant: at its sampler).
        with (
            step_cache(pipe.transformer, request.cache) as cache,
            variant_scheduler(pipe, self.spec, request, generator),
        ):
            output = pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                width=request.width,
                height=request.height,
                num_frames=request.frames,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=generator,
                output_type="np",
                callback_on_step_end=step_callback_for(on_step),
                **extra,
            )
        frames = _to_pil_frames(output.frames[0])
        return Video(frames, fps=self.spec.video.fps, seed=seed, cache=cache)


class ExpertPlacement:
    """Where a two-expert pipeline's parts are between their turns.

    Both experts (2 x 28 GB in bf16), the umT5-XXL text encoder (11 GB) and a 720p clip's
    activations do not all fit an 80 GB card, so on a GPU only the VAE and the expert of the
    current step stay on it: the text encoder comes on for encoding and goes back to host memory
    after, and the idle expert waits in host memory until its first step (the high-noise one at
    the start of a job, the low-noise one at the boundary). On the CPU every move is to where the
    module already is; the same calls run, so the tests run this path.
    """

    def __init__(self, pipe: Any, device: str, home: str = "cpu"):
        self.pipe = pipe
        self.device = device
        self.home = home  # where the idle parts wait
        self.swap_s = 0.0  # seconds spent moving experts, since the last ``take_swap_s``
        started = time.perf_counter()
        pipe.text_encoder.to(home)
        pipe.vae.to(device)
        pipe.transformer.to(device)
        pipe.transformer_2.to(home)
        self.active = "transformer"
        count_placing(time.perf_counter() - started)

    @contextmanager
    def text_encoder(self) -> Iterator[Any]:
        """The text encoder on the device for the block, back home after."""
        encoder = self.pipe.text_encoder
        encoder.to(self.device)
        try:
            yield encoder
        finally:
            encoder.to(self.home)

    def use(self, expert: str) -> None:
        """Put ``expert`` ("transformer" or "transformer_2") on the device and the other home."""
        if expert == self.active:
            return
        started = time.perf_counter()
        getattr(self.pipe, self.active).to(self.home)
        getattr(self.pipe, expert).to(self.device)
        self.active = expert
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        self.swap_s += time.perf_counter() - started

    def take_swap_s(self) -> float:
        seconds, self.swap_s = self.swap_s, 0.0
        return seconds


class WanA14BAdapter(Adapter):
    """Wan2.2-T2V-A14B (text-to-video) or Wan2.2-I2V-A14B (image-to-video): two experts, each
    with its own LoRA slot, the request's ``guidance_scale`` for the high-noise one and
    ``guidance_scale_2`` for the low-noise one. The job's timings say how many steps each expert
    ran (``expert_high_steps``, then ``expert_low_steps``), the boundary timestep between them,
    and the seconds spent moving experts (``expert_swap_s``)."""

    # Eager: the catalog gives these models no compiled profile (compiled blocks would move
    # between host and GPU with their expert). Not step-cached: diffusers' cache hooks sit on
    # one transformer.
    capabilities = Capabilities(loras=True, compile=True, warm_up=True)

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        import diffusers

        super().__init__(spec, weights, runtime)
        self.image_to_video = TaskKind.IMAGE_TO_VIDEO in spec.task_kinds
        pipeline_class = "WanImageToVideoPipeline" if self.image_to_video else "WanPipeline"
        # The same call loads the hub weights and the small local test models.
        self.pipe = getattr(diffusers, pipeline_class).from_pretrained(weights, dtype=runtime.dtype)
        if self.pipe.transformer_2 is None or self.pipe.config.boundary_ratio is None:
            raise ValueError(f"{weights} is not a two-expert model: no transformer_2 or boundary_ratio")
        if spec.boundary_ratio is not None and self.pipe.config.boundary_ratio != spec.boundary_ratio:
            raise ValueError(
                f"{weights} switches experts at {self.pipe.config.boundary_ratio}, the catalog says "
                f"{spec.boundary_ratio}"
            )
        self.pipe.set_progress_bar_config(disable=True)
        self.placement = ExpertPlacement(self.pipe, runtime.device)

    @property
    def pipeline(self) -> Any:
        return self.pipe

    def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Video:
        pipe = self.pipe

        # 1. Check inputs (see checked_video_inputs).
        extra = checked_video_inputs(pipe, request, inputs, self.image_to_video)

        # 2. Seed: drawn here when the caller gave none, and reported so the video can be redone.
        seed, generator = seeded_generator(request.seed)

        # 3. Encode the prompts with the text encoder on the device, then send it home.
        guided = request.guidance_scale > 1.0
        with self.placement.text_encoder():
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                do_classifier_free_guidance=guided,
                max_sequence_length=512,
                device=self.placement.device,
            )

        # 4. Denoise, the high-noise expert first; the step callback counts each expert's steps
        #    and brings the low-noise one in before its first step. Then decode.
        self.placement.take_swap_s()
        self.placement.use("transformer")  # the previous job may have left the low-noise one on
        boundary_t = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
        steps = {"transformer": 0, "transformer_2": 0}
        with variant_scheduler(pipe, self.spec, request):
            output = pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds if guided else None,
                width=request.width,
                height=request.height,
                num_frames=request.frames,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                guidance_scale_2=request.guidance_scale_2,
                generator=generator,
                output_type="np",
                callback_on_step_end=self._expert_steps(boundary_t, steps, on_step),
                **extra,
            )
        frames = _to_pil_frames(output.frames[0])
        timings = {
            "expert_high_steps": float(steps["transformer"]),
            "expert_low_steps": float(steps["transformer_2"]),
            "expert_boundary_t": round(boundary_t, 4),
            "expert_swap_s": round(self.placement.take_swap_s(), 4),
        }
        return Video(frames, fps=self.spec.video.fps, seed=seed, timings=timings)

    def _expert_steps(
        self, boundary_t: float, steps: dict[str, int], on_step: StepCallback
    ) -> Callable[..., dict[str, Any]]:
        """A ``callback_on_step_end`` that counts the step just run for the expert the pipeline
        chose for its timestep (the same test: at or above the boundary, high noise), and swaps
        the experts when the next step is the other's."""
        report = step_callback_for(on_step)

        def callback(pipe: Any, step_index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            steps["transformer" if float(timestep) >= boundary_t else "transformer_2"] += 1
            timesteps = pipe.scheduler.timesteps
            if step_index + 1 < len(timesteps):
                upcoming = float(timesteps[step_index + 1])
                self.placement.use("transformer" if upcoming >= boundary_t else "transformer_2")
            return report(pipe, step_index, timestep, tensors)

        return callback


class WanAnimateAdapter(Adapter):
    """Wan2.2-Animate-14B: a character image driven by pose and face videos ("move"), or put in
    place of the person of a video ("mix")."""

    # Warmed with made-up driving videos (worker/speed.py's ``_warm``).
    capabilities = Capabilities(loras=True, compile=True, warm_up=True)

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        from routing.settings import get_settings
        from worker.adapters.wan_animate.preprocess import Preprocessor

        super().__init__(spec, weights, runtime)
        settings = get_settings()
        # The official preprocessing is imported (and its patches checked) here, at load; its
        # models load with the first job from a photo and a video.
        self.preprocessor = Preprocessor(
            Path(weights) / "process_checkpoint",
            runtime.device,
            settings.preprocess_cache_dir,
            settings.preprocess_cache_bytes,
        )
        self.pipe = runtime.load("WanAnimatePipeline", weights)

    @property
    def pipeline(self) -> Any:
        return self.pipe

    def prepare(
        self, request: Any, inputs: Inputs, timings: dict[str, float], on_progress: ProgressCallback
    ) -> Inputs:
        """From a photo and a video: the official preprocessing's videos, made or found in its
        cache (``preprocess_cached`` 1 in ``timings``), beside the inputs the request brought.
        Its stages are reported as ``preprocess.<stage>`` (``wan_animate.progress.STAGES``)."""
        if request.video is None:
            return inputs
        from worker.adapters.wan_animate.preprocess import Options
        from worker.media import decode_video

        started = time.perf_counter()
        options = Options(
            mode=request.mode,
            retarget=bool(request.retarget),
            width=request.width,
            height=request.height,
            fps=self.spec.video.fps,
        )
        files, cached = self.preprocessor.run(
            inputs.stored["image"],
            inputs.stored["video"],
            options,
            lambda stage, done, total: on_progress(f"preprocess.{stage}", done, total),
        )
        made = Inputs(dict(inputs), stored=inputs.stored, job_id=inputs.job_id)
        for name, path in files.items():
            made[name], made[f"{name}_fps"] = decode_video(path.read_bytes())
        timings["preprocess_s"] = round(time.perf_counter() - started, 4)
        timings["preprocess_cached"] = 1.0 if cached else 0.0
        return made

    def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Video:
        pipe = self.pipe

        # 1. Check inputs.
        mode = _ANIMATE_MODES.get(request.mode)
        if mode is None:
            raise ValueError(f"unknown animate mode {request.mode!r}; known: {', '.join(_ANIMATE_MODES)}")
        multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        if request.width % multiple or request.height % multiple:
            raise ValueError(f"these weights need sizes in multiples of {multiple}")
        names = ["image", "pose_video", "face_video"]
        if mode == "replace":
            names += ["background_video", "mask_video"]
        missing = [
            name
            for name in names
            if inputs.get(name) is None or (isinstance(inputs[name], list) and not inputs[name])
        ]
        if missing:
            raise ValueError(f"{request.mode} needs {', '.join(missing)}")
        # Without a count, the output follows the driving video: one frame per pose frame.
        frames = request.frames if request.frames is not None else len(inputs["pose_video"])
        # Each segment continues from the previous one's last frame, so even one segment needs
        # a frame beyond that one.
        if frames is None or frames < ANIMATE_CONTINUATION_FRAMES + 1:
            raise ValueError(f"frames must be at least {ANIMATE_CONTINUATION_FRAMES + 1} (got {frames})")
        # The driving videos are made from one source video, frame for frame; the output has
        # one frame per driving frame, so each must cover the frames asked for.
        videos: dict[str, list[Image.Image]] = {}
        for name in names[1:]:
            if len(inputs[name]) < frames:
                if request.video is not None:  # made from the caller's video: name what was sent
                    raise ValueError(
                        f"the video has {len(inputs[name])} frames at {self.spec.video.fps} fps, "
                        f"fewer than the {frames} asked for"
                    )
                raise ValueError(f"{name} has {len(inputs[name])} frames, fewer than the {frames} asked for")
            videos[name] = list(inputs[name][:frames])
        size = (request.width, request.height)
        videos["pose_video"] = _resized(videos["pose_video"], size)
        # The motion encoder takes square face crops at its fixed size (512 for the real model).
        face = pipe.transformer.config.motion_encoder_size
        videos["face_video"] = _resized(videos["face_video"], (face, face))

        # A clip up to one segment long is made in one segment of its own length (rounded up to
        # the VAE's 4k+1); longer ones in 77-frame segments, as the model was trained.
        temporal = pipe.vae_scale_factor_temporal
        segment = min(ANIMATE_SEGMENT_FRAMES, -(-(frames - 1) // temporal) * temporal + 1)
        segments = _segment_count(frames, segment, ANIMATE_CONTINUATION_FRAMES)

        # 2. Seed.
        seed, generator = seeded_generator(request.seed)

        # 3. Denoise and decode, segment after segment. The pipeline restarts its step count in
        #    each segment; the job's progress counts all of them.
        done = 0

        def on_segment_step(_step: int, steps: int) -> None:
            nonlocal done
            done += 1
            on_step(done, steps * segments)

        output = pipe(
            image=inputs["image"].convert("RGB"),
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            mode=mode,
            segment_frame_length=segment,
            prev_segment_conditioning_frames=ANIMATE_CONTINUATION_FRAMES,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            generator=generator,
            output_type="np",
            callback_on_step_end=step_callback_for(on_segment_step),
            **videos,
        )
        return Video(_to_pil_frames(output.frames[0]), fps=self.spec.video.fps, seed=seed)


def _segment_count(frames: int, segment: int, continuation: int) -> int:
    """How many segments ``WanAnimatePipeline`` makes for ``frames`` output frames: after the
    first, each adds ``segment - continuation`` new frames; the last is padded to full length."""
    step = segment - continuation
    return -(-(frames - continuation) // step)


def checked_video_inputs(pipe: Any, request: Any, inputs: Inputs, image_to_video: bool) -> dict[str, Any]:
    """The pipeline call's input arguments (an image-to-video job's first frame), once the request
    is checked against these weights. The request was validated against the catalog at submit;
    the pipeline must agree, or the catalog is wrong for these weights: it would otherwise round
    the size and frame count silently and return something other than what was asked for."""
    multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    if request.width % multiple or request.height % multiple:
        raise ValueError(f"these weights need sizes in multiples of {multiple}")
    temporal = pipe.vae_scale_factor_temporal
    if request.frames < 1 or (request.frames - 1) % temporal:
        raise ValueError(f"frames must be {temporal}k+1 for these weights (got {request.frames})")
    if not image_to_video:
        return {}
    image = inputs.get("image")
    if image is None:
        raise ValueError("image-to-video needs an input image")
    from PIL import Image, ImageOps

    # The image becomes the first frame: cropped to the video's aspect ratio, not stretched.
    return {
        "image": ImageOps.fit(image.convert("RGB"), (request.width, request.height), Image.Resampling.LANCZOS)
    }

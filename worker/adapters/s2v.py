"""Wan2.2-S2V-14B through the official code (PyPI ``wan22``: ``wan.WanS2V``, config ``s2v-14B``),
as a *group model* (``worker.adapters.official_group``): every rank of the resident torchrun group
(``worker.group``) holds one, the DiT and T5 sharded by FSDP and the DiT's attention split over
the ranks by Ulysses.

The official code comes patched from ``worker.adapters.wan_s2v`` (one module per patch concern);
this module is the model: it loads ``WanS2V`` on a rank and runs jobs through it, on CUDA. Besides
``OfficialGroupModel``'s seams, ``_max_area`` (the pixels a frame is rendered at) is where a
subclass changes the size it runs at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.adapters.base import StepCallback, Video
from worker.adapters.official_group import OfficialGroupModel, fitted_image, video_to_frames
from worker.adapters.wan_s2v import progress
from worker.adapters.wan_s2v.official import import_wan_modules
from worker.adapters.wan_s2v.patch import patched
from worker.group.spec import GroupPlace

TASK = "s2v-14B"
# Frames of one clip: the catalog's frames_step, and generate.py's --infer_frames default.
CLIP_FRAMES = 80


class S2VGroupModel(OfficialGroupModel):
    """``wan.WanS2V`` resident on one rank of the group."""

    module = "wan.speech2video"
    task = TASK

    def _task(self, spec: Any) -> str:
        return TASK

    def _build(self, weights: str) -> Any:
        self._audio_clips: int | None = None
        pipe = self.modules["speech2video"].WanS2V(
            config=self.config, checkpoint_dir=weights, **self.official_options()
        )
        encode_audio = pipe.encode_audio

        def counting_encode_audio(*args: Any, **kwargs: Any) -> Any:
            embedding, clips = encode_audio(*args, **kwargs)
            self._audio_clips = clips
            return embedding, clips

        pipe.encode_audio = counting_encode_audio  # how many clips the speech needs
        return pipe

    def _max_area(self, request: Any) -> int:
        """The pixels a frame is fitted in: the size the caller asked for."""
        return request.width * request.height

    def run(self, request: Any, files: dict[str, Any], on_step: StepCallback, workdir: Path) -> Video | None:
        # The caller's width and height decide the frame: the reference image is cropped to their
        # aspect ratio and scaled to them (the official code keeps a smaller image's size), and
        # the official code fits that in width x height pixels at multiples of 64 (so 480 and
        # 720 high requests come out 448 and 704 high, as upstream's --size 832*480 does).
        reference = workdir / f"reference.rank{self.place.rank}.png"  # the ranks share workdir
        fitted_image(files["image"], request.width, request.height).save(reference)
        audio_path = files["audio"]
        steps = progress.Progress(steps_per_clip=request.steps, clips=0)

        def step() -> None:
            if not steps.clips:
                available = self._audio_clips or 1
                steps.clips = min(request.clips or available, available)
            steps.done += 1
            on_step(steps.done, steps.steps_per_clip * steps.clips)

        self._audio_clips = None
        with patched(progress.patches(step, (self.module,))), self.speed.applied():
            video = self.pipe.generate(
                input_prompt=request.prompt,
                ref_image_path=str(reference),
                audio_path=str(audio_path),
                enable_tts=False,
                tts_prompt_audio=None,
                tts_prompt_text=None,
                tts_text=None,
                num_repeat=request.clips,
                pose_video=str(files["pose_video"]) if files.get("pose_video") else None,
                max_area=self._max_area(request),
                infer_frames=CLIP_FRAMES,
                shift=self.config.sample_shift,
                sample_solver="unipc",
                sampling_steps=request.steps,
                guide_scale=request.guidance_scale,
                n_prompt=request.negative_prompt or "",
                seed=request.seed,
                offload_model=False,  # resident: the point of the group
                init_first_frame=False,
            )
        if self.place.rank != 0:
            return None
        frames = video_to_frames(video)
        return Video(
            frames,
            fps=int(self.config.sample_fps),
            seed=request.seed,
            audio=Path(audio_path).read_bytes(),
            timings=self.speed.timings(),
        )


__all__ = ["GroupPlace", "S2VGroupModel", "import_wan_modules", "video_to_frames"]

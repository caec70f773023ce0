"""Wan2.2-S2V-14B through the official code (PyPI ``wan22``: ``wan.WanS2V``, config ``s2v-14B``),
as a *group model*: every rank of the resident torchrun group (``worker.group``) holds one, with
the DiT and T5 sharded by FSDP and the DiT's attention split over the ranks by Ulysses sequence
parallelism, exactly as upstream ``generate.py --dit_fsdp --t5_fsdp --ulysses_size W`` sets it up.

The official code comes patched from ``worker.adapters.wan_s2v`` (one module per patch concern);
this module is the model: it loads ``WanS2V`` on a rank and runs jobs through it, on CUDA.
Three methods are where a subclass changes what the model runs on and at (``settings.group_adapters``
names the subclass): ``_config`` (the device and the s2v-14B config), ``_loading`` (what is in
force while the weights load) and ``_max_area`` (the pixels a frame is rendered at).
"""

from __future__ import annotations

import contextlib
import json
import math
import types
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routing.catalog import ModelSpec
from worker.adapters.base import Runtime, StepCallback, Video
from worker.adapters.wan_s2v import progress
from worker.adapters.wan_s2v.official import import_wan_modules
from worker.adapters.wan_s2v.patch import patched
from worker.group.spec import GroupPlace

if TYPE_CHECKING:
    import torch
    from PIL import Image

TASK = "s2v-14B"
# Frames of one clip: the catalog's frames_step, and generate.py's --infer_frames default.
CLIP_FRAMES = 80


class S2VGroupModel:
    """``wan.WanS2V`` resident on one rank of the group; ``run`` is called on every rank with the
    same job, and returns the video on rank 0 (None elsewhere)."""

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime, place: GroupPlace):
        from worker import adapters

        if not Path(weights).is_dir():
            raise FileNotFoundError(
                f"the official code reads a checkpoint folder, and {weights!r} is none: mirror "
                f"{spec.key} into the object store (`python -m worker.weights pull {spec.key}`, then "
                "`mirror`) for a worker with FLEET_WEIGHTS_CACHE_DIR, or name a folder in "
                "FLEET_MODEL_ROOT or FLEET_WEIGHTS"
            )
        adapters._quiet_loading()
        modules = import_wan_modules()
        self.spec = spec
        self.place = place
        self.config = self._config(modules, runtime.device)
        sharded = place.world_size > 1
        # Ulysses splits the DiT's heads over the ranks (generate.py asserts the same).
        dit_config = Path(weights) / "config.json"
        heads = json.loads(dit_config.read_text())["num_heads"] if dit_config.is_file() else None
        heads = heads or self.config.num_heads
        if sharded and heads % place.world_size:
            raise ValueError(f"{heads} attention heads do not split over {place.world_size} ranks")
        with self._loading(weights):
            # What upstream generate.py builds for --dit_fsdp --t5_fsdp --ulysses_size W.
            self.pipe = modules["speech2video"].WanS2V(
                config=self.config,
                checkpoint_dir=weights,
                device_id=place.local_rank,
                rank=place.rank,
                t5_fsdp=sharded,
                dit_fsdp=sharded,
                use_sp=sharded,
                t5_cpu=False,
                convert_model_dtype=False,
            )
        self._audio_clips: int | None = None
        encode_audio = self.pipe.encode_audio

        def counting_encode_audio(*args: Any, **kwargs: Any) -> Any:
            embedding, clips = encode_audio(*args, **kwargs)
            self._audio_clips = clips
            return embedding, clips

        self.pipe.encode_audio = counting_encode_audio  # how many clips the speech needs

    def _config(self, modules: dict[str, types.ModuleType], device: str) -> Any:
        """The s2v-14B config the model is built with on ``device``: the official one, on CUDA."""
        if device.split(":")[0] != "cuda":
            raise ValueError(f"Wan2.2-S2V runs on CUDA, not {device}")
        return modules["configs"].WAN_CONFIGS[TASK]

    def _loading(self, weights: str) -> AbstractContextManager[object]:
        """What is in force while ``WanS2V`` reads ``weights``: nothing replaced."""
        return contextlib.nullcontext()

    def _max_area(self, request: Any) -> int:
        """The pixels a frame is fitted in: the size the caller asked for."""
        return request.width * request.height

    def run(self, request: Any, files: dict[str, Any], on_step: StepCallback, workdir: Path) -> Video | None:
        # The caller's width and height decide the frame: the reference image is cropped to their
        # aspect ratio and scaled to them (the official code keeps a smaller image's size), and
        # the official code fits that in width x height pixels at multiples of 64 (so 480 and
        # 720 high requests come out 448 and 704 high, as upstream's --size 832*480 does).
        reference = workdir / f"reference.rank{self.place.rank}.png"  # the ranks share workdir
        _reference_image(files["image"], request.width, request.height).save(reference)
        audio_path = files["audio"]
        steps = progress.Progress(steps_per_clip=request.steps, clips=0)

        def step() -> None:
            if not steps.clips:
                available = self._audio_clips or 1
                steps.clips = min(request.clips or available, available)
            steps.done += 1
            on_step(steps.done, steps.steps_per_clip * steps.clips)

        self._audio_clips = None
        with patched(progress.patches(step)):
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
        )


def video_to_frames(video: torch.Tensor) -> list[Image.Image]:
    """The official output, (C, N, H, W) in [-1, 1], as RGB frames; NaN is an error."""
    import torch
    from PIL import Image

    if not bool(torch.isfinite(video).all()):
        raise RuntimeError("the model produced NaN or infinite pixels")
    pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(frame.numpy()) for frame in pixels.permute(1, 2, 3, 0).cpu()]


def _reference_image(path: str | Path, width: int, height: int) -> Image.Image:
    """The image centre-cropped to ``width / height`` and resized to ``width x height``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    target = width / height
    w, h = im.size
    if not math.isclose(w / h, target, rel_tol=1e-3):
        if w / h > target:
            new_w = max(1, round(h * target))
            left = (w - new_w) // 2
            im = im.crop((left, 0, left + new_w, h))
        else:
            new_h = max(1, round(w / target))
            top = (h - new_h) // 2
            im = im.crop((0, top, w, top + new_h))
    return im if im.size == (width, height) else im.resize((width, height), Image.Resampling.LANCZOS)


__all__ = ["GroupPlace", "S2VGroupModel", "import_wan_modules", "video_to_frames"]

"""Wan2.2-T2V-A14B and I2V-A14B through the official code (PyPI ``wan22``: ``wan.WanT2V`` and
``wan.WanI2V``, configs ``t2v-A14B`` and ``i2v-A14B``), as a *group model*
(``worker.adapters.official_group``): on every rank of the h100x8 worker's torchrun group, both
experts and T5 sharded by FSDP and each step's tokens split over the ranks by Ulysses. The 80 GB
class runs the same models through diffusers (``worker.adapters.wan.WanA14BAdapter``); the group
takes the clips that class does not hold (``routing.catalog``).

It reads the official checkpoint (``routing.catalog.checkpoint_spec``): ``high_noise_model/`` and
``low_noise_model/`` (one DiT each), the T5 encoder's and the Wan2.1 VAE's ``.pth`` and the T5
tokenizer. The job's timings say how many steps each expert ran, as on the 80 GB class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routing.catalog import ModelSpec, TaskKind
from worker.adapters.base import StepCallback, Video
from worker.adapters.official_group import OfficialGroupModel, fitted_image, video_to_frames
from worker.adapters.wan_s2v import progress
from worker.adapters.wan_s2v.patch import OfficialCodeMismatch, patched

# The checkpoint's expert folders (the configs' high_noise_checkpoint and low_noise_checkpoint).
EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")


class A14BGroupModel(OfficialGroupModel):
    """``wan.WanT2V`` or ``wan.WanI2V`` resident on one rank of the group."""

    def _task(self, spec: ModelSpec) -> str:
        if spec.official is None:
            raise ValueError(f"{spec.key} has no official checkpoint for the group to run")
        self.image_to_video = TaskKind.IMAGE_TO_VIDEO in spec.task_kinds
        self.module = "wan.image2video" if self.image_to_video else "wan.text2video"
        return spec.official.task

    def _dit_folders(self) -> tuple[str, ...]:
        return EXPERT_FOLDERS

    def _build(self, weights: str) -> Any:
        config = self.config
        if self.spec.boundary_ratio is not None and config.boundary != self.spec.boundary_ratio:
            raise ValueError(
                f"the official {self.task} switches experts at {config.boundary}, the catalog says "
                f"{self.spec.boundary_ratio}"
            )
        task_class = (
            self.modules["image2video"].WanI2V if self.image_to_video else self.modules["text2video"].WanT2V
        )
        if not hasattr(task_class, "_prepare_model_for_timestep"):
            raise OfficialCodeMismatch(
                f"{task_class.__name__} has no _prepare_model_for_timestep, which says which expert runs a step"
            )
        # wan22 on PyPI adds ``lightning``, default True: it would read the DiTs from a fixed
        # /mnt path and skip the unguided pass. Off, the classes are upstream's.
        pipe = task_class(config=config, checkpoint_dir=weights, lightning=False, **self.official_options())
        prepare = pipe._prepare_model_for_timestep

        def counting(t: Any, boundary: float, offload_model: bool) -> Any:
            self._expert_steps["high" if t.item() >= boundary else "low"] += 1
            return prepare(t, boundary, offload_model)

        pipe._prepare_model_for_timestep = counting  # which expert ran each step
        self._expert_steps = {"high": 0, "low": 0}
        return pipe

    def run(self, request: Any, files: dict[str, Any], on_step: StepCallback, workdir: Path) -> Video | None:
        width, height, frames = request.width, request.height, request.frames
        done = [0]

        def step() -> None:
            done[0] += 1
            on_step(done[0], request.steps)

        options: dict[str, Any] = {
            "input_prompt": request.prompt,
            "frame_num": frames,
            "shift": self.config.sample_shift,
            "sample_solver": "unipc",
            "sampling_steps": request.steps,
            # The official order is (low-noise expert, high-noise expert).
            "guide_scale": (float(request.guidance_scale_2), float(request.guidance_scale)),
            "n_prompt": request.negative_prompt or "",  # empty: the config's negative prompt
            "seed": request.seed,
            "offload_model": False,  # resident: the point of the group
        }
        if self.image_to_video:
            # WanI2V keeps the image's aspect ratio and fits it in max_area pixels at multiples of
            # 16: the image is first made the size asked for, and the area given a little room
            # (under 16 px a side) so rounding never takes it below that size.
            options["img"] = fitted_image(files["image"], width, height)
            options["max_area"] = width * height + min(width, height)
        else:
            options["size"] = (width, height)
        self._expert_steps = {"high": 0, "low": 0}
        with patched(progress.patches(step, (self.module,))), self.speed.applied():
            video = self.pipe.generate(**options)
        if self.place.rank != 0:
            return None
        made = video_to_frames(video)
        if (len(made), *made[0].size) != (frames, width, height):
            raise RuntimeError(
                f"the official {self.task} made {len(made)} frames of {made[0].size[0]}x{made[0].size[1]}, "
                f"not the {frames} of {width}x{height} asked for"
            )
        return Video(
            made,
            fps=int(self.config.sample_fps),
            seed=request.seed,
            timings=self.speed.timings()
            | {
                "expert_high_steps": float(self._expert_steps["high"]),
                "expert_low_steps": float(self._expert_steps["low"]),
                "expert_boundary_t": round(self.config.boundary * self.config.num_train_timesteps, 4),
            },
        )

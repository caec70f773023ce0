"""What the group models of the official Wan2.2 code share (PyPI ``wan22``, imported and patched
by ``worker.adapters.wan_s2v``): one task resident on every rank of the torchrun group
(``worker.group``), the DiTs and T5 sharded by FSDP and the DiTs' attention split over the ranks
by Ulysses, exactly as upstream ``generate.py --dit_fsdp --t5_fsdp --ulysses_size W`` sets it up.

``worker.adapters.s2v`` (``s2v-14B``) and ``worker.adapters.a14b`` (``t2v-A14B``, ``i2v-A14B``)
build on ``OfficialGroupModel``. Two methods are where a subclass changes what the model runs on
(``settings.group_adapters`` names the subclass): ``_config`` (the device and the task's config)
and ``_loading`` (what is in force while the weights load).
"""

from __future__ import annotations

import contextlib
import json
import logging
import types
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routing.catalog import ModelSpec
from worker.adapters.base import Runtime
from worker.adapters.wan_s2v.official import import_wan_modules
from worker.group.spec import GroupPlace

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from routing.settings import Settings

log = logging.getLogger(__name__)

# The SDPA kernels a group model's attention may prefer, by the names diffusers gives them (the
# fleet's attention settings use those names everywhere).
_SDPA_KERNELS = {
    "_native_cudnn": "CUDNN_ATTENTION",
    "_native_flash": "FLASH_ATTENTION",
    "_native_efficient": "EFFICIENT_ATTENTION",
    "_native_math": "MATH",
}


@dataclass(frozen=True)
class GroupSpeed:
    """What the official code runs with in the group, set for each job and put back after it (one
    rank process may hold several group models): TF32 for its float32 matmuls and convolutions,
    and the SDPA kernel its attention prefers (``worker.adapters.wan_s2v.attention`` runs SDPA
    where flash-attn is not installed; with flash-attn the official code calls it itself)."""

    tf32: bool = False
    attention: str = "native"  # a key of _SDPA_KERNELS; "native": SDPA's own; "flash"/"_flash_3": flash-attn

    def timings(self) -> dict[str, float]:
        """Its part of a job's timings (numbers, as the diffusers models' speed profile gives)."""
        return {"compile_regional": 0.0, "tf32": float(self.tf32), f"attention_{self.attention}": 1.0}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        import torch

        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        kernel: AbstractContextManager[object] = contextlib.nullcontext()
        if self.attention in _SDPA_KERNELS:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            first = getattr(SDPBackend, _SDPA_KERNELS[self.attention])
            rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            # Preferred, not forced: a call the kernel cannot serve falls back to the others.
            kernel = sdpa_kernel([first, *(b for b in rest if b != first)], set_priority=True)
        try:
            with kernel:
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def group_speed(spec: ModelSpec, device: str, settings: Settings) -> GroupSpeed:
    """The group speed of ``spec`` on ``device``: the catalog's h100x8 profile (none: the official
    code as it is), as FLEET_TF32 and FLEET_ATTENTION_BACKEND say; what the device lacks is not
    applied, and the reason logged."""
    from routing.classes import VramClass
    from routing.settings import switched
    from worker.adapters.wan_s2v.attention import flash_attn_available

    profile = spec.speed.get(VramClass.H100X8)
    tf32 = switched(settings.tf32, bool(profile and profile.tf32))
    cuda = device.split(":")[0] == "cuda"
    if tf32 and not cuda:
        log.warning("%s: TF32 asked for, runs without: TF32 needs a CUDA device, not %s", spec.key, device)
        tf32 = False
    if flash_attn_available():
        import importlib.util

        # The official code then calls flash-attn 3 where it is installed, else flash-attn 2.
        three = importlib.util.find_spec("flash_attn_interface") is not None
        return GroupSpeed(tf32, "_flash_3" if three else "flash")
    wanted = (
        [settings.attention_backend]
        if settings.attention_backend != "auto"
        else list(profile.attention if profile else ("native",))
    )
    for name in wanted:
        if name == "native" or (name in _SDPA_KERNELS and (cuda or name == "_native_math")):
            return GroupSpeed(tf32, name)
    log.warning("%s: attention %s is not an SDPA kernel this device has; SDPA chooses", spec.key, wanted)
    return GroupSpeed(tf32, "native")


class OfficialGroupModel:
    """The official code's ``task`` resident on one rank of the group; ``run`` is called on every
    rank with the same job, and returns the output on rank 0 (None elsewhere)."""

    # The official module whose ``generate`` runs the task (``progress.MODULES``), and the task.
    module = ""
    task = ""

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime, place: GroupPlace):
        from routing.catalog import checkpoint_spec
        from worker import adapters

        if not Path(weights).is_dir():
            checkpoint = checkpoint_spec(spec).key
            raise FileNotFoundError(
                f"the official code reads a checkpoint folder, and {weights!r} is none: mirror "
                f"{checkpoint} into the object store (`python -m worker.weights pull {checkpoint}`, then "
                "`mirror`) for a worker with FLEET_WEIGHTS_CACHE_DIR, or name a folder in "
                "FLEET_MODEL_ROOT or FLEET_WEIGHTS"
            )
        adapters._quiet_loading()
        self.modules = import_wan_modules()
        self.spec = spec
        self.place = place
        self.task = self._task(spec)
        self.config = self._config(self.modules, runtime.device)
        self.sharded = place.world_size > 1
        # Ulysses splits the DiTs' heads over the ranks (generate.py asserts the same).
        for heads in self._heads(Path(weights)):
            if self.sharded and heads % place.world_size:
                raise ValueError(f"{heads} attention heads do not split over {place.world_size} ranks")
        with self._loading(weights):
            self.pipe = self._build(weights)
        from routing.settings import get_settings

        self.speed = group_speed(spec, runtime.device, get_settings())
        log.info("%s in the group: %s", spec.key, self.speed)

    # --- what a task sets ---------------------------------------------------------------------

    def _task(self, spec: ModelSpec) -> str:
        """The official task name (``wan.configs.WAN_CONFIGS``)."""
        raise NotImplementedError

    def _dit_folders(self) -> tuple[str, ...]:
        """The folders of the checkpoint that hold a DiT (its ``config.json``)."""
        return ("",)

    def _build(self, weights: str) -> Any:
        """The official task's class, built from ``weights`` with ``official_options``."""
        raise NotImplementedError

    # --- the seams ----------------------------------------------------------------------------

    def _config(self, modules: dict[str, types.ModuleType], device: str) -> Any:
        """The task's config the model is built with on ``device``: the official one, on CUDA."""
        if device.split(":")[0] != "cuda":
            raise ValueError(f"the official Wan2.2 {self.task} runs on CUDA, not {device}")
        return modules["configs"].WAN_CONFIGS[self.task]

    def _loading(self, weights: str) -> AbstractContextManager[object]:
        """What is in force while the task's class reads ``weights``: nothing replaced."""
        return contextlib.nullcontext()

    # --- shared -------------------------------------------------------------------------------

    def official_options(self) -> dict[str, Any]:
        """What upstream generate.py passes for --dit_fsdp --t5_fsdp --ulysses_size W (all off on
        a group of one), the models kept as the checkpoint has them."""
        return {
            "device_id": self.place.local_rank,
            "rank": self.place.rank,
            "t5_fsdp": self.sharded,
            "dit_fsdp": self.sharded,
            "use_sp": self.sharded,
            "t5_cpu": False,
            "convert_model_dtype": False,
        }

    def _heads(self, weights: Path) -> list[int]:
        heads = []
        for folder in self._dit_folders():
            config = weights / folder / "config.json"
            found = json.loads(config.read_text()).get("num_heads") if config.is_file() else None
            heads.append(found or self.config.num_heads)
        return heads


def video_to_frames(video: torch.Tensor) -> list[Image.Image]:
    """The official output, (C, N, H, W) in [-1, 1], as RGB frames; NaN is an error."""
    import torch
    from PIL import Image

    if not bool(torch.isfinite(video).all()):
        raise RuntimeError("the model produced NaN or infinite pixels")
    pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(frame.numpy()) for frame in pixels.permute(1, 2, 3, 0).cpu()]


def fitted_image(path: str | Path, width: int, height: int) -> Image.Image:
    """The image centre-cropped to ``width / height`` and resized to ``width x height``."""
    import math

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

"""What stands in for the libraries the official preprocessing imports and the fleet does not
install (decord, moviepy, loguru), for its FLUX Kontext edit, and for its CUDA-only lines.

The module stand-ins are in ``sys.modules`` only while the official code imports
(``while_importing``); what it bound then is replaced for good by ``official.PATCHES``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from worker.adapters.wan_animate import progress
from worker.adapters.wan_s2v.standins import PyAVVideoReader, in_sys_modules


class VideoReader(PyAVVideoReader):
    """The part of ``decord.VideoReader`` that ``ProcessPipeline`` uses: its length, average
    frame rate, the last frame's (start, end) time, and a batch of frames."""

    def get_frame_timestamp(self, index: int) -> tuple[float, float]:
        index = index % len(self)
        return index / self._fps, (index + 1) / self._fps


class _ImageSequenceClip:
    """``moviepy.ImageSequenceClip(frames, fps).write_videofile(path)``: H.264 MP4 at ``fps``."""

    def __init__(self, frames: list[Any], fps: float):
        self.frames, self.fps = frames, fps

    def write_videofile(self, path: str, *_: Any, **__: Any) -> None:
        import numpy as np
        from PIL import Image

        from worker.media import encode_mp4

        images = [Image.fromarray(np.asarray(f).clip(0, 255).astype(np.uint8)) for f in self.frames]
        Path(path).write_bytes(encode_mp4(images, round(self.fps)))
        progress.video_written()


def moviepy_module() -> types.ModuleType:
    module = types.ModuleType("moviepy", "moviepy's ImageSequenceClip through PyAV (wan_animate.standins)")
    module.ImageSequenceClip = _ImageSequenceClip  # type: ignore[attr-defined]
    return module


class NoFluxKontext:
    """Stands for ``diffusers.FluxKontextPipeline``, which the fleet does not load: retargeting
    runs with the official code's path without it."""

    @classmethod
    def from_pretrained(cls, *_: Any, **__: Any) -> Any:
        raise NotImplementedError("retargeting with a FLUX Kontext edit is not supported yet")


def onnx_providers(device: str, available: Sequence[str]) -> list[Any]:
    """ONNX Runtime's execution providers for a model on ``device``: on CUDA, where onnxruntime
    offers it (the onnxruntime-gpu build), CUDA's on the device's index with the CPU's for what
    it lacks; else the CPU's alone."""
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnxruntime_on(onnxruntime: types.ModuleType, device: str) -> Any:
    """``onnxruntime`` as a module whose ``InferenceSession`` runs on ``onnx_providers(device)``,
    whatever providers its caller asked for; everything else is onnxruntime's."""

    class _OnnxRuntime(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(onnxruntime, name)

    providers = onnx_providers(device, onnxruntime.get_available_providers())

    def session(path: str, *args: Any, **kwargs: Any) -> Any:
        return onnxruntime.InferenceSession(path, *args, **(kwargs | {"providers": providers}))

    proxy = _OnnxRuntime("onnxruntime")
    proxy.InferenceSession = session  # type: ignore[attr-defined]
    return proxy


def torch_on(torch: types.ModuleType, device: str) -> Any:
    """``torch`` as a module whose ``device("cuda")`` is ``device``; everything else is torch's."""

    class _Torch(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    proxy = _Torch("torch")
    proxy.device = lambda name="cuda", *args: (  # type: ignore[attr-defined]
        torch.device(device) if name == "cuda" else torch.device(name, *args)
    )
    return proxy


def frames_on(load: Callable[..., Any], device: str) -> Callable[..., Any]:
    """``load_video_frames_v2`` that keeps frames on the CPU as loaded, then moves them to ``device``."""

    def load_on_device(*args: Any, **kwargs: Any) -> Any:
        kwargs["offload_video_to_cpu"] = True
        images, height, width = load(*args, **kwargs)
        return images.to(device), height, width

    return load_on_device


def sam2_1_predictor(predictor: type) -> type:
    """The official ``SAM2VideoPredictor`` with the state sam2 1.1 tracks by: its
    ``init_state_v2`` was written for sam2 before 1.1 and lacks ``frames_tracked_per_obj``."""

    class SAM2VideoPredictor(predictor):  # type: ignore[misc, valid-type]
        def init_state_v2(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            state = super().init_state_v2(*args, **kwargs)
            state.setdefault("frames_tracked_per_obj", {})
            return state

    SAM2VideoPredictor.__qualname__ = predictor.__qualname__
    SAM2VideoPredictor.__module__ = predictor.__module__
    return SAM2VideoPredictor


def _loguru_module() -> types.ModuleType:
    module = types.ModuleType("loguru", "loguru's logger as a standard logger (wan_animate.standins)")
    module.logger = logging.getLogger("wan.animate.preprocess")  # type: ignore[attr-defined]
    return module


def _decord_module() -> types.ModuleType:
    module = types.ModuleType("decord", "decord.VideoReader through PyAV (wan_animate.standins)")
    module.VideoReader = VideoReader  # type: ignore[attr-defined]
    return module


@contextlib.contextmanager
def while_importing() -> Iterator[None]:
    """The stand-ins in ``sys.modules`` for the libraries that are not installed; the modules
    there before are back after."""
    modules: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("decord") is None:
        modules["decord"] = _decord_module()
    if importlib.util.find_spec("moviepy") is None:
        modules["moviepy"] = modules["moviepy.editor"] = moviepy_module()
    if importlib.util.find_spec("loguru") is None:
        modules["loguru"] = _loguru_module()
    with in_sys_modules(modules):
        yield

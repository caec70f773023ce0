"""The official preprocessing modules, imported with stand-ins and patched (``PATCHES``).

The official code is a folder of scripts that import one another by bare name (``from pose2d
import Pose2d``), so the folder is on ``sys.path`` while it imports, and its modules stay in
``sys.modules`` under those names (``utils``, ``pose2d``, ``sam_utils``...). ``import_preprocess``
does it once per process:

1. the installed ``wan22`` must be the version the S2V adapter pins too;
2. ``decord``, ``moviepy`` and ``loguru`` (which the fleet does not install) are stand-ins in
   ``sys.modules`` only while the folder imports;
3. every attribute ``PATCHES`` or ``device_patches`` replaces must exist, so a changed package
   fails at load, naming what it no longer has;
4. ``PATCHES`` are applied; ``device_patches`` while the models load and run on a job's device.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
import types
from pathlib import Path
from typing import Any

from worker.adapters.wan_animate import progress, standins
from worker.adapters.wan_s2v.official import INSTALL, WAN22_VERSION, check_version
from worker.adapters.wan_s2v.patch import OfficialCodeMismatch, Patch, apply, instead, missing

log = logging.getLogger(__name__)

# The folder's modules by the bare names they import one another by.
MODULES = (
    "utils",
    "pose2d_utils",
    "pose2d",
    "human_visualization",
    "retarget_pose",
    "sam_utils",
    "video_predictor",
    "process_pipepline",
)


def _quiet(iterable: Any, *_: Any, **__: Any) -> Any:
    return iterable


PATCHES = (
    Patch(
        "process_pipepline",
        "VideoReader",
        instead(standins.VideoReader),
        "ProcessPipeline reads the driving video with decord.VideoReader: PyAV instead",
    ),
    Patch(
        "process_pipepline",
        "mpy",
        instead(standins.moviepy_module()),
        "ProcessPipeline writes its videos with moviepy: the fleet's H.264 encoder instead",
    ),
    Patch(
        "process_pipepline",
        "logger",
        instead(logging.getLogger("wan.animate.preprocess")),
        "loguru's logger: the standard logging module's",
    ),
    Patch(
        "process_pipepline",
        "FluxKontextPipeline",
        instead(standins.NoFluxKontext),
        "retargeting with a FLUX Kontext edit needs a second 12B model: retargeting runs without it",
    ),
    Patch(
        "video_predictor",
        "SAM2VideoPredictor",
        standins.sam2_1_predictor,
        "written for sam2 before 1.1 (the release on PyPI): its state gains frames_tracked_per_obj",
    ),
    Patch(
        "retarget_pose",
        "tqdm",
        instead(progress.bar("retarget")),
        "the retargeting loop's frames are the job's progress, not a bar in the worker log",
    ),
    Patch("sam_utils", "tqdm", instead(_quiet), "no progress bars in the worker log"),
    Patch(
        "sam2.sam2_video_predictor",
        "tqdm",
        instead(progress.bar("mask")),
        "SAM2's propagation through the frames is the job's progress, not a bar in the worker log",
    ),
)


def device_patches(device: str) -> tuple[Patch, ...]:
    """What the models need to load and run on ``device``: the ONNX models the providers
    onnxruntime offers for it; ``video_predictor``, off CUDA, its state and frames where they
    are (it puts them on ``torch.device("cuda")`` and ``.cuda()`` unconditionally)."""
    return (
        Patch(
            "pose2d",
            "onnxruntime",
            lambda onnxruntime: standins.onnxruntime_on(onnxruntime, device),
            "SimpleOnnxInference asks for CUDAExecutionProvider whenever the device is cuda: "
            "CUDA's where onnxruntime offers it (the onnxruntime-gpu build), else the CPU's",
        ),
        Patch(
            "video_predictor",
            "torch",
            lambda torch: standins.torch_on(torch, device),
            "SAM2VideoPredictor.init_state_v2 names the cuda device: the job's device instead",
            when=lambda: not device.startswith("cuda"),
        ),
        Patch(
            "video_predictor",
            "load_video_frames_v2",
            lambda load: standins.frames_on(load, device),
            "load_video_frames_v2 moves frames with .cuda() unless offloaded: offloaded, then moved",
            when=lambda: not device.startswith("cuda"),
        ),
    )


_lock = threading.Lock()
_modules: dict[str, types.ModuleType] = {}


def import_preprocess() -> dict[str, types.ModuleType]:
    """The official preprocessing modules, patched, by their bare names (``MODULES``)."""
    with _lock:
        if not _modules:
            check_version()
            found = _import()
            absent = missing(PATCHES + device_patches("cpu"))
            if absent:
                raise OfficialCodeMismatch(
                    f"wan22 {WAN22_VERSION} as installed has no {', '.join(absent)}, which the "
                    f"Animate preprocessing replaces: the package changed under its version "
                    f"(reinstall: {INSTALL})"
                )
            apply(PATCHES)
            _modules.update(found)
        return _modules


def forget() -> None:
    """Import again on the next call (tests change the imported modules)."""
    with _lock:
        _modules.clear()


def _folder() -> Path:
    spec = importlib.util.find_spec("wan")
    if spec is None or spec.submodule_search_locations is None:
        raise OfficialCodeMismatch(f"wan22 is not installed: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "modules" / "animate" / "preprocess"
    if not (folder / "process_pipepline.py").is_file():
        raise OfficialCodeMismatch(f"wan22 has no {folder.name} folder at {folder}: {INSTALL}")
    return folder


def _import() -> dict[str, types.ModuleType]:
    folder = str(_folder())
    sys.path.insert(0, folder)
    try:
        with standins.while_importing():
            importlib.import_module("process_pipepline")
            # Named by the SAM2 config it builds (``video_predictor.SAM2VideoPredictor``), which
            # hydra imports by that name when the predictor is built.
            importlib.import_module("video_predictor")
    finally:
        sys.path.remove(folder)
    return {name: sys.modules[name] for name in MODULES}

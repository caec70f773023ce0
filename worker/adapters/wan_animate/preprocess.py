"""Wan-Animate's official preprocessing on one job's photo and video, on the job's device.

``Preprocessor.run`` gives what the precomputed form of a request brings: the pose and face
videos, and in mix mode the background and mask videos, each an MP4 as the official
``ProcessPipeline`` writes it (through ``standins``). Results are kept in a folder by the
content hashes of the photo, the video and the options (``cache_key``), least recently used
evicted first past ``cache_bytes``, so another prompt or seed on the same inputs skips the work.

A video in which the detector finds no person in any frame fails with ``NoPersonFound`` before
anything else runs on it; so does a photo without one in move mode (its pose is read first).

Its stages report each frame (each video, when written) to the caller's hook (``progress``),
which may raise to end the work there; nothing of a run that ended so is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routing.errors import ErrorType
from worker.adapters.base import ProgressCallback
from worker.adapters.wan_animate import progress
from worker.adapters.wan_animate.official import WAN22_VERSION, device_patches, import_preprocess
from worker.adapters.wan_s2v.patch import patched

log = logging.getLogger(__name__)

# The official code's file names: in its output folder, and in the weights' process_checkpoint.
OUTPUTS = {
    "pose_video": "src_pose.mp4",
    "face_video": "src_face.mp4",
    "background_video": "src_bg.mp4",
    "mask_video": "src_mask.mp4",
}
# How many of them each mode writes.
_VIDEOS = {"move": 2, "mix": 4}
_DETECTOR = "det"
_POSE = "pose2d"
_SAM2 = "sam2"
# The SAM2 config of the official checkpoint; a folder may name another in ``sam2.json``.
_SAM2_DEFAULT = {"config": "sam2_hiera_l.yaml", "overrides": []}


class NoPersonFound(Exception):
    """The person detector found nobody: there is no pose to take or person to replace."""

    error_type = ErrorType.NO_PERSON_FOUND


@dataclass(frozen=True)
class Options:
    """What changes preprocessing's output besides the inputs' bytes."""

    mode: str  # move | mix
    retarget: bool
    width: int
    height: int
    fps: int

    def key(self, image: bytes, video: bytes) -> str:
        """The cache key: content hashes of the inputs and these options, and the code's version."""
        digest = hashlib.sha256()
        for part in (hashlib.sha256(image).digest(), hashlib.sha256(video).digest()):
            digest.update(part)
        digest.update(json.dumps([WAN22_VERSION, self.__dict__], sort_keys=True).encode())
        return digest.hexdigest()


class Preprocessor:
    """The official detector, pose model and SAM2 of one ``process_checkpoint`` folder, loaded on
    first use and kept; one job preprocesses at a time."""

    def __init__(self, weights: Path, device: str, cache_dir: Path, cache_bytes: int):
        self.modules = import_preprocess()  # a changed official package fails here, at load
        self.weights = weights
        self.device = device
        self.cache = ResultCache(cache_dir, cache_bytes)
        self._pipeline: Any = None
        self._lock = threading.Lock()

    def run(
        self, image: bytes, video: bytes, options: Options, on_progress: ProgressCallback | None = None
    ) -> tuple[dict[str, Path], bool]:
        """The output videos' files by request field, and whether they came from the cache;
        ``on_progress`` is told each frame of each stage (``progress.STAGES``) as it is done."""
        key = options.key(image, video)
        with self._lock:
            found = self.cache.get(key)
            if found is not None:
                return found, True
            with tempfile.TemporaryDirectory(prefix="animate-preprocess-") as tmp:
                work = Path(tmp)
                (work / "out").mkdir()
                (work / "image").write_bytes(image)
                (work / "video.mp4").write_bytes(video)
                self._run(work, options, on_progress or _ignore)
                made = {name: work / "out" / file for name, file in OUTPUTS.items()}
                made = {name: path for name, path in made.items() if path.is_file()}
                return self.cache.put(key, made), False

    def _run(self, work: Path, options: Options, on_progress: ProgressCallback) -> None:
        with patched(device_patches(self.device)), progress.reporting_to(on_progress, _VIDEOS[options.mode]):
            pipeline = self._load()
            watched = _Watched(pipeline.pose2d, image_first=options.mode == "move")
            pipeline.pose2d = watched
            try:
                pipeline(
                    str(work / "video.mp4"),
                    str(work / "image"),
                    str(work / "out"),
                    resolution_area=[options.width, options.height],
                    fps=options.fps,
                    retarget_flag=options.retarget,
                    use_flux=False,
                    replace_flag=options.mode == "mix",
                )
            finally:
                pipeline.pose2d = watched.close()

    def _load(self) -> Any:
        if self._pipeline is not None:
            return self._pipeline
        modules = self.modules
        missing = [name for name in (_DETECTOR, _POSE, _SAM2) if not (self.weights / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"the preprocessing weights are not installed: {self.weights} has no {', '.join(missing)} "
                f"(the weights path brings them with the model's: `python -m worker.weights pull`, "
                f"`mirror` and `fill` take its catalog entry's extra files too)"
            )
        # What ProcessPipeline.__init__ builds, on the job's device (it names cuda) and with the
        # SAM2 config the checkpoint was saved from (it names the large one).
        pipeline = object.__new__(modules["process_pipepline"].ProcessPipeline)
        pipeline.pose2d = modules["pose2d"].Pose2d(
            checkpoint=str(_one(self.weights / _POSE, ".onnx")),
            detector_checkpoint=str(_one(self.weights / _DETECTOR, ".onnx")),
            device=self.device,
        )
        sam2 = self.weights / _SAM2
        config = _SAM2_DEFAULT
        if (sam2 / "sam2.json").is_file():
            config = json.loads((sam2 / "sam2.json").read_text())
        pipeline.predictor = modules["sam_utils"].build_sam2_video_predictor(
            config["config"],
            str(_one(sam2, ".pt")),
            device=self.device,
            hydra_overrides_extra=list(config["overrides"]),
        )
        self._pipeline = pipeline
        return pipeline


def _one(folder: Path, suffix: str) -> Path:
    found = sorted(folder.glob(f"*{suffix}"))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder} should hold one {suffix} file, has {len(found)}")
    return found[0]


def _ignore(stage: str, done: int, total: int) -> None:
    pass


class _Watched:
    """``Pose2d`` for one job: it reports each frame its detector (``detect``) and its pose model
    (``pose``) are done with, and fails with ``NoPersonFound`` when the detector finds nobody in
    any of the frames of a call (the official code would go on with the whole frame as the
    person). A call on one frame (the photo; the video's first frame alone, before retargeting)
    is no stage of its own: it is not reported. ``close`` gives back the ``Pose2d``, as it was."""

    def __init__(self, pose2d: Any, image_first: bool):
        self.pose2d = pose2d
        self.calls = 0
        self.image_first = image_first
        self.found: list[bool] = []
        self.posed = 0
        self.frames = 0
        detect, estimate = pose2d.detector.forward, pose2d.model.forward

        def detecting(*args: Any, **kwargs: Any) -> Any:
            results = detect(*args, **kwargs)
            self.found += [people[0]["track_id"] >= 0 for people in results]
            self._report("detect", len(self.found))
            return results

        def estimating(*args: Any, **kwargs: Any) -> Any:
            keypoints = estimate(*args, **kwargs)
            self.posed += 1
            self._report("pose", self.posed)
            return keypoints

        # On the instances: SimpleOnnxInference.__call__ calls self.forward.
        pose2d.detector.forward, pose2d.model.forward = detecting, estimating

    def _report(self, stage: str, done: int) -> None:
        if self.frames > 1:
            progress.report(stage, done, self.frames)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pose2d, name)

    def __call__(self, frames: Any, *args: Any, **kwargs: Any) -> Any:
        self.found, self.posed, self.frames = [], 0, len(frames)
        if self.frames > 1:
            progress.frames_are(self.frames)
        source = "image" if self.image_first and self.calls == 0 else "video"
        self.calls += 1
        metas = self.pose2d(frames, *args, **kwargs)
        if not any(self.found):
            raise NoPersonFound(f"no person found in the {source}: the detector found nobody in it")
        return metas

    def close(self) -> Any:
        del self.pose2d.detector.forward, self.pose2d.model.forward
        return self.pose2d


class ResultCache:
    """Preprocessing's outputs by key, one folder each, least recently used evicted first once
    the folders take more than ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, Path] | None:
        folder = self.root / key
        if not (folder / "done").is_file():
            return None
        (folder / "done").write_text(str(time.time_ns()))  # when last used: finer than mtimes
        return {name: folder / file for name, file in OUTPUTS.items() if (folder / file).is_file()}

    def put(self, key: str, files: dict[str, Path]) -> dict[str, Path]:
        folder = self.root / key
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        for name, path in files.items():
            shutil.copyfile(path, tmp / OUTPUTS[name])
        (tmp / "done").write_text(str(time.time_ns()))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        self._evict(keep=key)
        return {name: folder / OUTPUTS[name] for name in files}

    def _evict(self, keep: str) -> None:
        entries = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not (folder / "done").is_file():
                continue
            size = sum(f.stat().st_size for f in folder.iterdir())
            entries.append((int((folder / "done").read_text() or 0), folder, size))
        total = sum(size for _, _, size in entries)
        for _, folder, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)
                total -= size

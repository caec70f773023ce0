"""Wan-Animate's official preprocessing, run on the small stand-ins of its models: what it makes
from a photo and a video in each mode, the stages it reports and a stop at one of them, the
person check, the result cache, the ONNX providers it picks, and the patch table that fails at
load when the official code changed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from worker.adapters.base import JobCanceled
from worker.adapters.wan_animate import official
from worker.adapters.wan_animate.preprocess import NoPersonFound, Options, Preprocessor, ResultCache
from worker.adapters.wan_animate.standins import onnx_providers
from worker.adapters.wan_s2v.patch import OfficialCodeMismatch
from worker.media import decode_video, encode_mp4, encode_png


def _frame(i: int, person: bool = True) -> Image.Image:
    image = Image.new("RGB", (64, 48), (90, 120, 150) if person else (0, 0, 0))
    if person:
        ImageDraw.Draw(image).rectangle((20 + 2 * i, 6, 36 + 2 * i, 44), fill=(220, 180, 140))
    return image


PHOTO = encode_png(_frame(0))
VIDEO = encode_mp4([_frame(i) for i in range(8)], 30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from testkit.small_models.animate_preprocess import build_process_checkpoint

    folder = tmp_path_factory.mktemp("weights") / "process_checkpoint"
    build_process_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def preprocessor(checkpoint, tmp_path_factory) -> Preprocessor:
    return Preprocessor(checkpoint, "cpu", tmp_path_factory.mktemp("cache"), 10**9)


def _options(mode: str, **changes) -> Options:
    return Options(**({"mode": mode, "retarget": False, "width": 64, "height": 48, "fps": 30} | changes))


def _frames(path: Path) -> list[Image.Image]:
    return decode_video(path.read_bytes())[0]


def _stages(reports: list[tuple[str, int, int]]) -> list[tuple[str, int]]:
    """Each stage in the order reported, with its total; every stage counted 1, 2, ... total."""
    stages: list[tuple[str, int]] = []
    previous = 0
    for stage, done, total in reports:
        if not stages or stages[-1][0] != stage:
            assert done == 1, (stage, done)
            stages.append((stage, total))
        else:
            assert done == previous + 1 and total == stages[-1][1], (stage, done, total)
        previous = done
    return stages


def test_move_makes_pose_and_face_videos_one_frame_per_video_frame(preprocessor):
    files, cached = preprocessor.run(PHOTO, VIDEO, _options("move"))
    assert not cached and files.keys() == {"pose_video", "face_video"}
    pose, face = _frames(files["pose_video"]), _frames(files["face_video"])
    assert len(pose) == len(face) == 8
    assert pose[0].size == (64, 48) and face[0].size == (512, 512)  # the official face crop size
    # The stand-in pose model puts a skeleton in the middle: drawn, on black.
    assert pose[0].getbbox() is not None and pose[0].getpixel((0, 0)) == (0, 0, 0)


def test_mix_adds_the_background_and_the_persons_mask_reporting_each_frame(preprocessor):
    reports: list[tuple[str, int, int]] = []
    files, cached = preprocessor.run(PHOTO, VIDEO, _options("mix"), lambda *report: reports.append(report))
    assert not cached and files.keys() == {"pose_video", "face_video", "background_video", "mask_video"}
    assert {len(_frames(path)) for path in files.values()} == {8}
    assert _stages(reports) == [("detect", 8), ("pose", 8), ("mask", 8), ("encode", 4)]
    # From the cache: nothing to report.
    reports.clear()
    assert preprocessor.run(PHOTO, VIDEO, _options("mix"), lambda *report: reports.append(report))[1]
    assert reports == []


def test_frame_rate_is_normalised_to_the_models(preprocessor):
    at_15 = encode_mp4([_frame(i) for i in range(8)], 15)  # 0.53 s: 16 frames at 30 fps
    files, _ = preprocessor.run(PHOTO, at_15, _options("move"))
    assert len(_frames(files["pose_video"])) == 16


def test_retarget_runs_and_draws_another_pose(preprocessor):
    plain, _ = preprocessor.run(PHOTO, VIDEO, _options("move"))
    reports: list[tuple[str, int, int]] = []
    fitted, cached = preprocessor.run(
        PHOTO, VIDEO, _options("move", retarget=True), lambda *report: reports.append(report)
    )
    assert not cached and len(_frames(fitted["pose_video"])) == 8
    assert fitted["pose_video"] != plain["pose_video"]
    # The photo's and the first frame's poses, one frame each, are no stage of their own.
    assert _stages(reports) == [("detect", 8), ("pose", 8), ("retarget", 8), ("encode", 2)]


def test_a_stop_at_a_reported_frame_ends_the_work_and_keeps_nothing(preprocessor):
    reports: list[tuple[str, int, int]] = []

    def stop_at_the_third_pose(stage: str, done: int, total: int) -> None:
        reports.append((stage, done, total))
        if (stage, done) == ("pose", 3):
            raise JobCanceled()

    # A size no other test here asks for: nothing of this run can be in the cache before it.
    options = _options("move", width=48, height=48)
    with pytest.raises(JobCanceled):
        preprocessor.run(PHOTO, VIDEO, options, stop_at_the_third_pose)
    assert reports[-1] == ("pose", 3, 8) and not any(stage == "encode" for stage, _, _ in reports)
    # Nothing of it was cached: the same job runs it whole.
    files, cached = preprocessor.run(PHOTO, VIDEO, options)
    assert not cached and files.keys() == {"pose_video", "face_video"}


def test_the_same_inputs_and_options_come_from_the_cache(preprocessor):
    first, _ = preprocessor.run(PHOTO, VIDEO, _options("move"))
    again, cached = preprocessor.run(PHOTO, VIDEO, _options("move"))
    assert cached and again == first
    _, other_size = preprocessor.run(PHOTO, VIDEO, _options("move", width=48, height=64))
    assert other_size is False


def test_a_video_without_a_person_fails_naming_it(preprocessor):
    black = encode_mp4([_frame(i, person=False) for i in range(8)], 30)
    with pytest.raises(NoPersonFound, match="no person found in the video"):
        preprocessor.run(PHOTO, black, _options("mix"))
    with pytest.raises(NoPersonFound, match="no person found in the image"):
        preprocessor.run(encode_png(_frame(0, person=False)), VIDEO, _options("move"))


def test_onnx_runs_on_cuda_where_onnxruntime_offers_it_else_on_the_cpu(preprocessor):
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cuda", gpu_build) == [
        ("CUDAExecutionProvider", {"device_id": 0}),
        "CPUExecutionProvider",
    ]
    assert onnx_providers("cuda:1", gpu_build)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert onnx_providers("cuda", ["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert onnx_providers("cpu", gpu_build) == ["CPUExecutionProvider"]
    # The loaded models' sessions here: this machine's device is the CPU.
    pose2d = preprocessor._load().pose2d
    assert (
        pose2d.detector.session.get_providers()
        == pose2d.model.session.get_providers()
        == ["CPUExecutionProvider"]
    )


def test_the_cache_evicts_the_least_recently_used_past_its_bytes(tmp_path):
    source = tmp_path / "pose.mp4"
    source.write_bytes(b"x" * 100)
    cache = ResultCache(tmp_path / "cache", max_bytes=250)
    cache.put("a", {"pose_video": source})
    cache.put("b", {"pose_video": source})
    assert cache.get("a") is not None  # a is now the more recently used
    cache.put("c", {"pose_video": source})  # 300 bytes: one must go
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None


def test_a_renamed_attribute_of_the_official_code_fails_at_load_naming_it(checkpoint, monkeypatch, tmp_path):
    from routing.catalog import CATALOG
    from worker.adapters.base import Runtime
    from worker.adapters.wan import WanAnimateAdapter

    official.import_preprocess()
    monkeypatch.delattr(sys.modules["process_pipepline"], "VideoReader")
    official.forget()
    try:
        with pytest.raises(OfficialCodeMismatch, match=r"has no process_pipepline\.VideoReader"):
            WanAnimateAdapter(CATALOG["wan2.2-animate-14b"], str(tmp_path), Runtime.resolve("cpu", "float32"))
    finally:
        official.forget()

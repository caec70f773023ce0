"""Animate from only a photo and a video, end to end: Redis, a real worker process running Wan's
official preprocessing on the small stand-ins of its models (ONNX detector and pose model, a
small SAM2), then the small ``WanAnimatePipeline``."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from routing.catalog import CATALOG
from routing.errors import ErrorType
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.integration.test_every_kind import picture, run, video_of
from worker.media import encode_mp4

pytestmark = pytest.mark.integration

FRAMES = 9


def dancing(frames: int = FRAMES, lit: bool = True) -> bytes:
    """A figure crossing a lit room; unlit, all black (the detector stand-in finds nobody)."""
    images = []
    for i in range(frames):
        image = Image.new("RGB", (64, 64), (90, 110, 130) if lit else (0, 0, 0))
        if lit:
            ImageDraw.Draw(image).rectangle((12 + 3 * i, 6, 30 + 3 * i, 60), fill=(230, 190, 150))
        images.append(image)
    return encode_mp4(images, 30)


@pytest.fixture
def fleet(client, start_worker, fleet_settings, tmp_path):
    settings = fleet_settings.model_copy(
        update={"worker_class": "gpu80", "preprocess_cache_dir": tmp_path / "preprocess-cache"}
    )
    start_worker(settings)
    return client, LocalStorage(fleet_settings.storage_dir)


def request(client, mode: str, video: dict, **extra) -> dict:
    return {
        "model": "wan2.2-animate-14b",
        "mode": mode,
        "prompt": "a person dancing",
        "image": client.upload(picture(90)),
        "video": video,
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 1,
    } | extra


def test_move_and_mix_from_a_photo_and_a_video_and_a_second_job_skips_preprocessing(fleet):
    client, storage = fleet
    video = client.upload(dancing())
    fps = CATALOG["wan2.2-animate-14b"].video.fps

    move = run(client, request(client, "move", video))
    frames, got_fps, _ = video_of(storage, move)
    # No frame count asked for: one output frame per frame of the driving video.
    assert len(frames) == FRAMES and frames[0].size == (64, 64) and got_fps == fps
    assert move.timings["preprocess_cached"] == 0.0 and move.timings["preprocess_s"] > 0

    mix = run(client, request(client, "mix", video))
    assert len(video_of(storage, mix)[0]) == FRAMES and mix.timings["preprocess_cached"] == 0.0

    # Another prompt and seed on the same photo and video: preprocessing is found, not run.
    again = run(client, request(client, "move", video, prompt="another dance", seed=2))
    assert len(video_of(storage, again)[0]) == FRAMES
    assert again.timings["preprocess_cached"] == 1.0
    assert again.timings["preprocess_s"] < move.timings["preprocess_s"]

    fitted = run(client, request(client, "move", video, retarget=True))
    assert len(video_of(storage, fitted)[0]) == FRAMES and fitted.timings["preprocess_cached"] == 0.0


def test_a_video_without_a_person_fails_as_no_person_found_before_the_pipeline_runs(fleet):
    client, _ = fleet
    record = client.submit(request(client, "mix", client.upload(dancing(lit=False)))).wait(timeout_s=300)
    assert record.status is JobStatus.FAILED
    assert record.error.type is ErrorType.NO_PERSON_FOUND
    assert "no person found in the video" in record.error.message
    assert "inference_s" not in record.timings and record.step == 0

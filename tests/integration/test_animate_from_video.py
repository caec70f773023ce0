"""Animate from only a photo and a video, end to end: Redis, a real worker process running Wan's
official preprocessing on the small stand-ins of its models (ONNX detector and pose model, a
small SAM2), then the small ``WanAnimatePipeline``; preprocessing's stages in the job's events,
and a cancel that stops it. The worker gets the model's weights, and the preprocessing weights
with them, by the weights path: mirrored into the store, filled into its node cache."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from producer.client import Client
from routing.catalog import CATALOG
from routing.errors import ErrorType
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.integration.test_every_kind import picture, run, video_of
from worker.media import encode_mp4
from worker.weights.mirror import mirror

pytestmark = pytest.mark.integration

FRAMES = 9


def events_of(client: Client, job_id: str) -> list[dict[str, str]]:
    """The job's own event stream, as the API's live events read it."""
    entries = client.store.client.xrange(client.store.keys.job_events(job_id))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def preprocessing(events: list[dict[str, str]]) -> list[dict[str, str]]:
    return [e for e in events if e["type"] == "job.progress" and e.get("stage", "").startswith("preprocess.")]


def dancing(frames: int = FRAMES, lit: bool = True) -> bytes:
    """A figure crossing a lit room; unlit, all black (the detector stand-in finds nobody)."""
    images = []
    for i in range(frames):
        image = Image.new("RGB", (64, 64), (90, 110, 130) if lit else (0, 0, 0))
        if lit:
            ImageDraw.Draw(image).rectangle((12 + 3 * i, 6, 30 + 3 * i, 60), fill=(230, 190, 150))
        images.append(image)
    return encode_mp4(images, 30)


MODEL = "wan2.2-animate-14b"


@pytest.fixture
def fleet(client, start_worker, fleet_settings, small_models_dir, tmp_path):
    storage = LocalStorage(fleet_settings.storage_dir)
    mirror(storage, CATALOG[MODEL], small_models_dir / MODEL)
    settings = fleet_settings.model_copy(
        update={
            "worker_class": "gpu80",
            "preprocess_cache_dir": tmp_path / "preprocess-cache",
            "weights_cache_dir": tmp_path / "node-cache",
            "model_root": None,  # no other way to the weights than the node cache
        }
    )
    start_worker(settings)
    return client, storage, tmp_path / "node-cache" / MODEL


def request(client, mode: str, video: dict, **extra) -> dict:
    return {
        "model": MODEL,
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
    client, storage, node_copy = fleet
    video = client.upload(dancing())
    fps = CATALOG[MODEL].video.fps

    move = run(client, request(client, "move", video))
    frames, got_fps, _ = video_of(storage, move)
    # No frame count asked for: one output frame per frame of the driving video.
    assert len(frames) == FRAMES and frames[0].size == (64, 64) and got_fps == fps
    assert move.timings["preprocess_cached"] == 0.0 and move.timings["preprocess_s"] > 0
    # Preprocessing read its weights where the weights path put them.
    assert {"det/yolov10m.onnx", "pose2d/vitpose_h_wholebody.onnx"} <= {
        p.relative_to(node_copy / "process_checkpoint").as_posix()
        for p in (node_copy / "process_checkpoint").rglob("*.onnx")
    }

    mix = run(client, request(client, "mix", video))
    assert len(video_of(storage, mix)[0]) == FRAMES and mix.timings["preprocess_cached"] == 0.0
    # Preprocessing's stages in the job's events, each from its first frame on, before the
    # pipeline's steps (which name no stage); one event a stage, then one per interval at most.
    events = events_of(client, mix.id)
    progress = [e for e in events if e["type"] == "job.progress"]
    stages = preprocessing(events)
    assert progress[: len(stages)] == stages and all("stage" not in e for e in progress[len(stages) :])
    firsts = [e for i, e in enumerate(stages) if i == 0 or stages[i - 1]["stage"] != e["stage"]]
    assert [(e["stage"], e["step"], e["total"]) for e in firsts] == [
        ("preprocess.detect", "1", str(FRAMES)),
        ("preprocess.pose", "1", str(FRAMES)),
        ("preprocess.mask", "1", str(FRAMES)),
        ("preprocess.encode", "1", "4"),
    ]
    assert all(0 < int(e["step"]) <= int(e["total"]) for e in stages)
    interval_s = client.settings.preprocess_progress_interval_s  # as the worker was started with
    assert len(stages) <= len(firsts) + mix.timings["preprocess_s"] / interval_s + 1

    # Another prompt and seed on the same photo and video: preprocessing is found, not run.
    again = run(client, request(client, "move", video, prompt="another dance", seed=2))
    assert len(video_of(storage, again)[0]) == FRAMES
    assert again.timings["preprocess_cached"] == 1.0
    assert again.timings["preprocess_s"] < move.timings["preprocess_s"]

    fitted = run(client, request(client, "move", video, retarget=True))
    assert len(video_of(storage, fitted)[0]) == FRAMES and fitted.timings["preprocess_cached"] == 0.0


def test_no_person_found_and_a_cancel_end_a_job_in_preprocessing_before_the_pipeline_runs(fleet):
    client, _, _ = fleet
    record = client.submit(request(client, "mix", client.upload(dancing(lit=False)))).wait(timeout_s=300)
    assert record.status is JobStatus.FAILED
    assert record.error.type is ErrorType.NO_PERSON_FOUND
    assert "no person found in the video" in record.error.message
    assert "inference_s" not in record.timings
    assert [e["type"] for e in events_of(client, record.id)][-1] == "job.failed"
    assert all("stage" in e for e in events_of(client, record.id) if e["type"] == "job.progress")

    # Canceled once preprocessing has reported a frame: it stops at the next frame, and the job
    # ends canceled without a step of the pipeline.
    job = client.submit(request(client, "mix", client.upload(dancing(frames=2 * FRAMES))))
    stream, last, seen = client.store.keys.job_events(job.id), "0-0", []
    while not preprocessing(seen):
        reply = client.store.client.xread({stream: last}, block=60_000)
        assert reply, "no preprocessing progress within 60 s"
        for entry_id, fields in reply[0][1]:
            last = entry_id
            seen.append({k.decode(): v.decode() for k, v in fields.items()})
    assert client.get(job.id).stage.startswith("preprocess.")  # what the job's status shows
    client.cancel(job.id)
    record = job.wait(timeout_s=120)
    assert record.status is JobStatus.CANCELED
    events = events_of(client, job.id)
    assert events[-1]["type"] == "job.canceled"
    progress = [e for e in events if e["type"] == "job.progress"]
    assert progress == preprocessing(events)  # not one denoising step
    assert "inference_s" not in record.timings

"""Every task kind end to end: Redis, a real worker process, each model's real diffusers pipeline
on small random weights, input media from the store, PNG and MP4 outputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from producer.client import Client
from routing.catalog import CATALOG
from routing.io.media import check_video
from routing.io.storage import LocalStorage
from routing.jobs.record import JobRecord, JobStatus
from worker.media import decode_video, encode_mp4, encode_png

pytestmark = pytest.mark.integration


def picture(hue: int, size: tuple[int, int] = (64, 64)) -> bytes:
    image = Image.new("RGB", size, (hue, 100, 255 - hue))
    ImageDraw.Draw(image).ellipse((16, 8, 48, 56), fill=(255 - hue, 200, hue))
    return encode_png(image)


def clip(hue: int, frames: int = 9, fps: int = 30) -> bytes:
    images = []
    for i in range(frames):
        image = Image.new("RGB", (64, 64), (hue, 60, 60))
        ImageDraw.Draw(image).rectangle((8 + 4 * i, 8, 24 + 4 * i, 56), fill=(255, 255, 255))
        images.append(image)
    return encode_mp4(images, fps)


@pytest.fixture
def fleet(client: Client, start_worker, fleet_settings):
    """One gpu80 worker: it consumes gpu80 and gpu16, so it runs every kind here."""
    start_worker(fleet_settings.model_copy(update={"worker_class": "gpu80"}))
    return client, LocalStorage(fleet_settings.storage_dir)


def run(client: Client, request: dict) -> JobRecord:
    record = client.submit(request).wait(timeout_s=300)
    assert record.status is JobStatus.SUCCEEDED, record.error
    return record


def image_of(storage: LocalStorage, record: JobRecord) -> Image.Image:
    [output] = record.outputs
    assert output.content_type == "image/png"
    return Image.open(io.BytesIO(storage.get(output.key)))


def differ(a: Image.Image, b: Image.Image) -> float:
    """Share of pixels that differ between two images of one size."""
    return float(np.mean(np.any(np.asarray(a) != np.asarray(b), axis=-1)))


def test_text_to_image_qwen_image(fleet):
    client, storage = fleet
    record = run(client, {"model": "qwen-image", "prompt": "a fox", "width": 64, "height": 80, "steps": 2})
    assert image_of(storage, record).size == (64, 80)


@pytest.mark.parametrize(
    ("model", "count"), [("qwen-image-edit", 1), ("qwen-image-edit-2509", 2), ("qwen-image-edit-2509", 3)]
)
def test_edit_uses_its_input_images(fleet, model, count):
    client, storage = fleet
    images = [client.upload(picture(40 + 60 * i)) for i in range(count)]
    other = client.upload(picture(230))
    base = {"model": model, "prompt": "add a hat", "width": 64, "height": 64, "steps": 2, "seed": 5}

    first = image_of(storage, run(client, base | {"images": images}))
    second = image_of(storage, run(client, base | {"images": [other, *images[1:]]}))

    assert first.size == second.size == (64, 64)
    # Random weights spread attention thinly over each image's tokens, so one changed input
    # moves a few percent of pixels; the same inputs and seed give the same image exactly.
    assert differ(first, second) > 0.01
    if count == 1:
        again = image_of(storage, run(client, base | {"images": images}))
        assert differ(first, again) == 0


def video_of(storage: LocalStorage, record: JobRecord) -> tuple[list[Image.Image], float, bytes]:
    [output] = record.outputs
    assert output.content_type == "video/mp4" and output.key.endswith(".mp4")
    data = storage.get(output.key)
    frames, fps = decode_video(data)
    return frames, fps, data


def test_text_to_video_has_the_requested_frames_size_and_fps(fleet):
    client, storage = fleet
    request = {
        "model": "wan2.2-ti2v-5b",
        "kind": "text-to-video",
        "prompt": "waves",
        "width": 64,
        "height": 96,
        "frames": 9,
        "steps": 2,
    }
    record = run(client, request)
    frames, fps, data = video_of(storage, record)
    assert len(frames) == 9 and frames[0].size == (64, 96)
    assert fps == CATALOG["wan2.2-ti2v-5b"].video.fps == 24
    info = check_video(data, max_frames=100, max_duration_s=10, max_side=1024)
    assert (info.frames, info.width, info.height) == (9, 64, 96)
    assert (record.outputs[0].frames, record.outputs[0].fps) == (9, 24)


def test_image_to_video_uses_its_image(fleet):
    client, storage = fleet
    base = {
        "model": "wan2.2-ti2v-5b",
        "kind": "image-to-video",
        "prompt": "it moves",
        "width": 64,
        "height": 64,
        "frames": 5,
        "steps": 2,
        "seed": 3,
    }
    first, _, _ = video_of(storage, run(client, base | {"image": client.upload(picture(30))}))
    second, _, _ = video_of(storage, run(client, base | {"image": client.upload(picture(220))}))
    assert len(first) == len(second) == 5
    assert differ(first[0], second[0]) > 0.1


@pytest.mark.parametrize("mode", ["move", "mix"])
def test_animate(fleet, mode):
    client, storage = fleet
    request = {
        "model": "wan2.2-animate-14b",
        "mode": mode,
        "prompt": "a person dancing",
        "image": client.upload(picture(90)),
        "pose_video": client.upload(clip(10)),
        "face_video": client.upload(clip(200)),
        "width": 64,
        "height": 64,
        "frames": 9,
        "steps": 2,
        "seed": 1,
    }
    if mode == "mix":
        request |= {"background_video": client.upload(clip(120)), "mask_video": client.upload(clip(250))}
    frames, fps, _ = video_of(storage, run(client, request))
    assert len(frames) == 9 and frames[0].size == (64, 64)
    assert fps == CATALOG["wan2.2-animate-14b"].video.fps

"""Output options end to end (Redis, a real worker process, real pipelines on small weights):
several images from one job, each redone alone from its seed; WebP and JPEG outputs; a cached
video reported as cached; the video's CRF."""

from __future__ import annotations

import io
import re

import av
import pytest
from PIL import Image

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobRecord, JobStatus

pytestmark = pytest.mark.integration

SMALL_IMAGE = {"model": "z-image-turbo", "prompt": "a red fox in snow", "width": 96, "height": 64, "steps": 2}
SMALL_VIDEO = {
    "model": "wan2.2-ti2v-5b",
    "kind": "text-to-video",
    "prompt": "a red fox in snow",
    "width": 64,
    "height": 64,
    "frames": 9,
    "steps": 4,
    "seed": 5,
}


@pytest.fixture
def fleet(client: Client, start_worker, fleet_settings) -> tuple[Client, LocalStorage]:
    start_worker()
    return client, LocalStorage(fleet_settings.storage_dir)


def run(client: Client, request: dict) -> JobRecord:
    record = client.submit(request).wait(timeout_s=300)
    assert record.status is JobStatus.SUCCEEDED, record.error
    return record


def test_four_outputs_each_redone_alone_from_its_seed(fleet):
    client, storage = fleet
    record = run(client, {**SMALL_IMAGE, "num_outputs": 4, "seed": 41})

    assert [o.seed for o in record.outputs] == [41, 42, 43, 44]
    assert [o.key for o in record.outputs] == [f"jobs/{record.id}/attempt-1/output-{i}.png" for i in range(4)]
    assert record.total_steps == 4 * 2
    pictures = [storage.get(o.key) for o in record.outputs]
    assert len(set(pictures)) == 4

    alone = run(client, {**SMALL_IMAGE, "seed": record.outputs[3].seed})
    [output] = alone.outputs
    assert output.seed == 44
    assert storage.get(output.key) == pictures[3]  # bit for bit


@pytest.mark.parametrize(
    ("output_format", "pil_format", "ext", "content_type"),
    [("webp", "WEBP", "webp", "image/webp"), ("jpeg", "JPEG", "jpg", "image/jpeg")],
)
def test_lossy_formats_decode_at_the_requested_size(fleet, output_format, pil_format, ext, content_type):
    client, storage = fleet
    record = run(
        client, {**SMALL_IMAGE, "output_format": output_format, "output_quality": 80, "num_outputs": 2}
    )

    for index, output in enumerate(record.outputs):
        assert output.key == f"jobs/{record.id}/attempt-1/output-{index}.{ext}"
        assert output.content_type == content_type
        image = Image.open(io.BytesIO(storage.get(output.key)))
        assert image.format == pil_format
        assert image.size == (96, 64) == (output.width, output.height)
        image.load()


def x264_crf(mp4: bytes) -> float:
    """The CRF the video was encoded at, as x264 wrote it in its settings message (an SEI in the
    first packet: "x264 - core ... crf=40.0 ...")."""
    with av.open(io.BytesIO(mp4)) as container:
        first = next(container.demux(container.streams.video[0]))
        found = re.search(rb"x264 - core .*?crf=([0-9.]+)", bytes(first))
    assert found is not None, "no x264 settings message in the video"
    return float(found.group(1))


def test_a_cached_video_says_so_and_the_crf_reaches_the_encoder(fleet):
    client, storage = fleet
    plain = run(client, SMALL_VIDEO)
    cached = run(
        client, {**SMALL_VIDEO, "cache": {"method": "first_block", "threshold": 0.5}, "video_crf": 40}
    )

    [plain_out], [cached_out] = plain.outputs, cached.outputs
    assert plain_out.cache is None
    assert cached_out.cache == "first_block"
    assert cached.request["cache"] == {"method": "first_block", "threshold": 0.5}
    assert cached_out.content_type == "video/mp4" and cached_out.key.endswith(".mp4")
    # The encoder ran at the request's CRF, and at the default 18 without one (read from the
    # files: catches a video_crf dropped on the way, or a default other than the documented one).
    assert x264_crf(storage.get(cached_out.key)) == 40.0
    assert x264_crf(storage.get(plain_out.key)) == 18.0
    assert len(storage.get(cached_out.key)) == cached_out.size_bytes

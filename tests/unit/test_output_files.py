"""Each shape of ``Generated`` through ``worker.outputs``: the files it gives, their content types,
what they decode to, the records stored for them, and the same files written for a group's
supervisor (and read back as the runner stores them)."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from routing.io.storage import LocalStorage
from routing.schemas import parse_request
from worker import outputs
from worker.adapters.base import EncodedVideo, Images, Video
from worker.group.files import read_output, write_output
from worker.media import encode_wav

JOB = "0123456789abcdef0123456789abcdef"


def _picture(width: int, height: int, shade: int) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.arange(width, dtype=np.uint8)[None, :] * 3
    pixels[..., 1] = shade
    return Image.fromarray(pixels)


def _frames(count: int, width: int = 64, height: int = 48) -> list[Image.Image]:
    return [_picture(width, height, 10 * i) for i in range(count)]


def _video_facts(data: bytes) -> tuple[int, int, int, float, list[str]]:
    with av.open(io.BytesIO(data)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video))
        kinds = [stream.type for stream in container.streams]
        return video.width, video.height, frames, float(video.average_rate), kinds


@pytest.mark.parametrize(
    ("image_format", "quality", "ext", "content_type", "pil_format"),
    [
        ("png", None, "png", "image/png", "PNG"),
        ("webp", 80, "webp", "image/webp", "WEBP"),
        ("jpeg", 90, "jpg", "image/jpeg", "JPEG"),
    ],
)
def test_images_are_one_file_each_in_the_requested_format(
    tmp_path: Path, image_format: str, quality: int | None, ext: str, content_type: str, pil_format: str
) -> None:
    generated = Images(
        [_picture(64, 32, 0), _picture(64, 32, 200)], seed=5, seeds=[5, 6], cache="first_block"
    )
    timings: dict[str, float] = {}
    stored = outputs.store(
        LocalStorage(tmp_path), JOB, 1, generated, outputs.Encoding(image_format, quality), timings
    )

    assert [o.key for o in stored] == [f"jobs/{JOB}/attempt-1/output-{i}.{ext}" for i in range(2)]
    assert [(o.content_type, o.width, o.height, o.seed, o.cache) for o in stored] == [
        (content_type, 64, 32, 5, "first_block"),
        (content_type, 64, 32, 6, "first_block"),
    ]
    assert all(o.frames is None and o.fps is None for o in stored)
    for output in stored:
        data = (tmp_path / output.key).read_bytes()
        assert output.size_bytes == len(data)
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.size) == (pil_format, (64, 32))
    assert set(timings) == {"encode_s", "store_s"}


def test_png_images_keep_their_pixels_and_one_seed_serves_images_without_seeds() -> None:
    picture = _picture(40, 24, 77)
    (file,) = outputs.encode(Images([picture], seed=9))
    assert (file.ext, file.content_type, file.seed) == ("png", "image/png", 9)
    with Image.open(io.BytesIO(file.data)) as image:
        assert np.array_equal(np.asarray(image), np.asarray(picture))


def test_a_videos_frames_become_one_mp4_with_its_audio(tmp_path: Path) -> None:
    speech = encode_wav(np.sin(np.linspace(0, 800, 16000)).astype(np.float32) * 0.3, 16000)
    generated = Video(_frames(12), fps=8, seed=3, audio=speech)
    stored = outputs.store(LocalStorage(tmp_path), JOB, 2, generated, outputs.Encoding(video_crf=30), {})

    (output,) = stored
    assert output.key == f"jobs/{JOB}/attempt-2/output-0.mp4"
    assert (output.content_type, output.width, output.height) == ("video/mp4", 64, 48)
    assert (output.frames, output.fps, output.seed, output.cache) == (12, 8, 3, None)
    assert _video_facts((tmp_path / output.key).read_bytes()) == (64, 48, 12, 8.0, ["video", "audio"])


def test_the_video_crf_decides_the_size() -> None:
    frames = _frames(8)
    (fine,) = outputs.encode(Video(frames, fps=8), outputs.Encoding(video_crf=10))
    (coarse,) = outputs.encode(Video(frames, fps=8), outputs.Encoding(video_crf=45))
    assert len(coarse.data) < len(fine.data)


def test_an_encoded_video_is_stored_byte_for_byte(tmp_path: Path) -> None:
    (made,) = outputs.encode(Video(_frames(6), fps=12))
    generated = EncodedVideo(
        made.data, width=64, height=48, frame_count=6, fps=12, seed=4, cache="taylorseer"
    )
    (output,) = outputs.store(LocalStorage(tmp_path), JOB, 1, generated, outputs.Encoding(), {})

    assert (tmp_path / output.key).read_bytes() == made.data
    assert (output.key, output.content_type) == (f"jobs/{JOB}/attempt-1/output-0.mp4", "video/mp4")
    assert (output.width, output.height, output.frames, output.fps) == (64, 48, 6, 12)
    assert (output.seed, output.cache, output.size_bytes) == (4, "taylorseer", len(made.data))


def test_something_else_is_not_an_output() -> None:
    with pytest.raises(TypeError, match="not a generated output"):
        outputs.encode([_picture(8, 8, 0)])  # type: ignore[arg-type]


def test_the_encoding_follows_the_request() -> None:
    image = parse_request(
        {"model": "z-image-turbo", "prompt": "p", "width": 64, "height": 64, "output_format": "webp"}
    )
    video = parse_request(
        {
            "model": "wan2.2-ti2v-5b",
            "kind": "text-to-video",
            "prompt": "p",
            "width": 64,
            "height": 64,
            "frames": 5,
            "video_crf": 23,
        }
    )
    speech = parse_request(
        {
            "model": "wan2.2-s2v-14b",
            "prompt": "p",
            "width": 832,
            "height": 480,
            "image": {"key": "uploads/_/face.png"},
            "audio": {"key": "uploads/_/speech.wav"},
        }
    )
    assert outputs.Encoding.of(image) == outputs.Encoding("webp", image.output_quality)
    assert outputs.Encoding.of(video) == outputs.Encoding(video_crf=23)
    assert outputs.Encoding.of(speech) == outputs.Encoding()  # no output fields: the defaults


def test_the_group_writes_images_as_pngs_and_the_supervisor_reads_them_back(tmp_path: Path) -> None:
    pictures = [_picture(32, 16, 0), _picture(32, 16, 90)]
    result = write_output(Images(pictures, seed=1, seeds=[1, 2], cache="first_block"), "job-1", tmp_path)

    assert result.paths == [str(tmp_path / "output-0.png"), str(tmp_path / "output-1.png")]
    back = read_output(result)
    assert isinstance(back, Images)
    assert (back.seed, back.seeds, back.cache) == (1, [1, 2], "first_block")
    assert [np.asarray(im).tolist() for im in back.images] == [np.asarray(im).tolist() for im in pictures]


def test_the_group_writes_a_video_as_one_mp4_and_the_supervisor_reads_it_encoded(tmp_path: Path) -> None:
    result = write_output(Video(_frames(10), fps=16, seed=7), "job-1", tmp_path, crf=28)

    assert result.path == str(tmp_path / "output.mp4")
    assert (result.width, result.height, result.frame_count, result.fps, result.seed) == (64, 48, 10, 16, 7)
    back = read_output(result)
    assert isinstance(back, EncodedVideo)
    assert back.data == (tmp_path / "output.mp4").read_bytes()
    assert _video_facts(back.data) == (64, 48, 10, 16.0, ["video"])
    assert (back.width, back.height, back.frame_count, back.fps, back.seed) == (64, 48, 10, 16, 7)

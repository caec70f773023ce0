"""Input media checks (routing.io.media) and MP4 encoding and decoding (worker.media)."""

from __future__ import annotations

import io
import random
import struct
import wave
import zlib
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from routing.io import media
from routing.io.media import (
    DecodeBudget,
    DecodeBudgetError,
    MediaError,
    check_audio,
    check_image,
    check_video,
)
from worker.media import decode_audio, decode_image, decode_video, encode_mp4, encode_video

GARBAGE = random.Random(7).randbytes(20_000)


def image_bytes(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def wav_bytes(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(tone, channels).tobytes())
    return buffer.getvalue()


def frames(n: int, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    # Changing content, so the encoder cannot collapse frames into nothing.
    return [Image.new("RGB", size, (i * 7 % 256, 120, 255 - i * 5 % 256)) for i in range(n)]


# --- check_image --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_check_image_accepts_common_formats(fmt: str) -> None:
    info = check_image(image_bytes(fmt), max_pixels=10_000, max_side=100)
    assert (info.width, info.height, info.format) == (64, 48, fmt)


def test_check_image_refuses_random_bytes() -> None:
    with pytest.raises(MediaError, match="not an image"):
        check_image(GARBAGE, max_pixels=10**6, max_side=1000)


def test_check_image_refuses_truncated_png() -> None:
    data = image_bytes("PNG", (256, 256))
    with pytest.raises(MediaError, match="corrupt or truncated"):
        check_image(data[: len(data) // 2], max_pixels=10**6, max_side=1000)


def test_check_image_refuses_over_pixel_limit() -> None:
    with pytest.raises(MediaError, match="64x48"):
        check_image(image_bytes("PNG"), max_pixels=64 * 48 - 1, max_side=1000)
    with pytest.raises(MediaError, match="per side"):
        check_image(image_bytes("PNG"), max_pixels=10**6, max_side=63)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("side", "message"), [(12_000, "12000x12000"), (40_000, "too large")])
def test_check_image_refuses_bomb_from_header_alone(side: int, message: str) -> None:
    # Refused from the header, before any attempt to allocate the pixels (430 MB and 4.8 GB).
    # Pillow refuses the larger one itself on open, past its own limit.
    with pytest.raises(MediaError, match=message):
        check_image(png_claiming(side, side), max_pixels=4096 * 4096, max_side=16_384)


def test_decode_image_flattens_transparency_to_rgb() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


# --- check_video / check_audio ------------------------------------------------------------------


def test_check_video_on_encoded_mp4() -> None:
    data = encode_mp4(frames(30), 30)
    info = check_video(data, max_frames=100, max_duration_s=10, max_side=1000)
    assert (info.width, info.height, info.frames, info.fps) == (64, 48, 30, 30.0)
    assert info.duration_s == pytest.approx(1.0, abs=0.05)
    assert info.has_audio is False


def test_check_video_refuses_over_limits() -> None:
    data = encode_mp4(frames(30), 30)
    with pytest.raises(MediaError, match="frames"):
        check_video(data, max_frames=29, max_duration_s=10, max_side=1000)
    with pytest.raises(MediaError, match="s long"):
        check_video(data, max_frames=100, max_duration_s=0.5, max_side=1000)
    with pytest.raises(MediaError, match="per side"):
        check_video(data, max_frames=100, max_duration_s=10, max_side=32)


def mkv_bytes(
    n: int, size: tuple[int, int] = (64, 48), fps: int = 24, declared_frames: int | None = None
) -> bytes:
    """Motion JPEG in Matroska, which gives no frame count, only a duration; ``declared_frames``
    rewrites that duration so the container says it holds that many frames, whatever it holds."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as out:
        stream = out.add_stream("mjpeg", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuvj420p"
        for i, image in enumerate(frames(n, size)):
            frame = av.VideoFrame.from_image(image).reformat(format="yuvj420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    data = bytearray(buffer.getvalue())
    if declared_frames is not None:
        # The Segment's Duration element (id 0x4489, 8-byte float, in milliseconds).
        at = data.index(b"\x44\x89\x88") + 3
        data[at : at + 8] = struct.pack(">d", 1000 * declared_frames / fps)
    return bytes(data)


class _CountingContainer:
    """A container whose ``decode`` counts the frames it hands out."""

    def __init__(self, container: av.container.InputContainer, counts: list[int]) -> None:
        self._container, self._counts = container, counts

    def __getattr__(self, name: str) -> object:
        return getattr(self._container, name)

    def __enter__(self) -> _CountingContainer:
        self._container.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._container.__exit__(*exc)

    def decode(self, *args: object, **kwargs: object) -> Iterator[av.VideoFrame]:
        for frame in self._container.decode(*args, **kwargs):
            self._counts[-1] += 1
            yield frame


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Frames decoded by each container ``check_video`` opens, in order."""
    counts: list[int] = []
    opened = media.open_container

    def counting(*args: object, **kwargs: object) -> _CountingContainer:
        counts.append(0)
        return _CountingContainer(opened(*args, **kwargs), counts)

    monkeypatch.setattr(media, "open_container", counting)
    return counts


def _check(data: bytes, budget: DecodeBudget) -> media.VideoInfo:
    return check_video(data, max_frames=100, max_duration_s=10, max_side=1000, budget=budget)


# MP4 counts its frames; Matroska gives a duration, from which the frames are reckoned.
CONTAINERS = {"mp4": lambda: encode_mp4(frames(30), 30), "mkv": lambda: mkv_bytes(30)}


@pytest.mark.parametrize("container", CONTAINERS)
def test_a_video_that_costs_exactly_the_decode_budget_is_decoded_whole(container: str, decoded) -> None:
    budget = DecodeBudget(64 * 48 * 30)
    assert _check(CONTAINERS[container](), budget).frames == 30
    assert budget.spent == 64 * 48 * 30 and decoded == [30]


@pytest.mark.parametrize("container", CONTAINERS)
def test_a_video_over_the_decode_budget_is_refused_from_its_metadata_before_a_frame_is_decoded(
    container: str, decoded
) -> None:
    with pytest.raises(DecodeBudgetError, match="video is 64x48 x 30 frames: 92160 pixels to decode"):
        _check(CONTAINERS[container](), DecodeBudget(64 * 48 * 30 - 1))
    assert decoded == [0]


def test_the_decode_budget_is_shared_by_the_videos_of_a_request(decoded) -> None:
    budget = DecodeBudget(64 * 48 * 50)
    _check(encode_mp4(frames(30), 30), budget)
    # 20 frames are left: the next 30-frame video is refused unread, a 20-frame one is taken.
    with pytest.raises(DecodeBudgetError, match="may decode 153600 pixels in all"):
        _check(encode_mp4(frames(30), 30), budget)
    assert _check(encode_mp4(frames(20), 30), budget).frames == 20
    assert decoded == [30, 0, 20]


def test_a_video_whose_metadata_under_reports_is_stopped_as_its_decoding_passes_the_budget(decoded) -> None:
    data = mkv_bytes(30, declared_frames=2)
    with av.open(io.BytesIO(data)) as c:  # the container says 2 frames; it holds 30
        assert round(c.duration / av.time_base * 24) == 2
    assert _check(data, DecodeBudget(64 * 48 * 30)).frames == 30
    with pytest.raises(DecodeBudgetError, match="more pixels than are left"):
        _check(data, DecodeBudget(64 * 48 * 10))
    assert decoded == [30, 11]  # decoding stopped at the frame that passed the budget


@pytest.mark.parametrize("data", [GARBAGE, b"", image_bytes("PNG")], ids=["random", "empty", "png"])
def test_check_video_refuses_non_video(data: bytes) -> None:
    with pytest.raises(MediaError, match="not a video"):
        check_video(data, max_frames=100, max_duration_s=10, max_side=1000)


@pytest.mark.parametrize("container", CONTAINERS)
def test_sample_frames_picks_evenly_from_the_first_to_the_last(container: str) -> None:
    """MP4 says how many frames it holds; Matroska does not, and they are counted first."""
    source = frames(30)
    picked = media.sample_frames(CONTAINERS[container](), 4)
    # Frames 0, 10, 19 and 29: each closest to the source frame of its index, not its neighbours.
    for image, index in zip(picked, (0, 10, 19, 29), strict=True):
        distances = [_distance(image, frame) for frame in source]
        assert distances.index(min(distances)) == index, (index, distances)
    assert len(media.sample_frames(CONTAINERS[container](), 100)) == 30  # every one of fewer
    assert len(media.sample_frames(CONTAINERS[container](), 1)) == 1


def _distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16)).mean())


def test_check_audio_on_wav() -> None:
    info = check_audio(wav_bytes(1.25, rate=22050, channels=2), max_duration_s=5)
    assert info.duration_s == pytest.approx(1.25, abs=1e-3)
    assert (info.sample_rate, info.channels, info.codec) == (22050, 2, "pcm_s16le")


def test_check_audio_refuses_over_long() -> None:
    with pytest.raises(MediaError, match="longer than"):
        check_audio(wav_bytes(2.0), max_duration_s=1.5)


@pytest.mark.parametrize("data", [GARBAGE, image_bytes("PNG")], ids=["random", "png"])
def test_check_audio_refuses_non_audio(data: bytes) -> None:
    with pytest.raises(MediaError, match="not audio"):
        check_audio(data, max_duration_s=10)


def test_decode_audio_resamples_to_mono() -> None:
    samples, rate = decode_audio(wav_bytes(1.0, rate=44100, channels=2), sample_rate=16000, layout="mono")
    assert rate == 16000 and samples.dtype == np.float32
    assert samples.shape[0] == 1 and abs(samples.shape[1] - 16000) <= 32


# --- encode_mp4 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [24, 30])
def test_encode_mp4_round_trip(fps: int) -> None:
    data = encode_mp4(frames(fps + 5), fps)
    decoded, decoded_fps = decode_video(data)
    assert len(decoded) == fps + 5
    assert decoded[0].size == (64, 48) and decoded[0].mode == "RGB"
    assert decoded_fps == fps
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.time_base == Fraction(1, fps) and stream.average_rate == fps
    # faststart: the index comes before the media data, so playback can start while loading.
    assert data.index(b"moov") < data.index(b"mdat")


def test_encode_mp4_keeps_colours() -> None:
    red = Image.new("RGB", (32, 32), (220, 20, 20))
    decoded, _ = decode_video(encode_mp4([red] * 3, 24))
    assert np.abs(np.asarray(decoded[1], dtype=int) - np.asarray(red, dtype=int)).max() < 12


def test_encode_mp4_pads_odd_sizes_to_even() -> None:
    decoded, _ = decode_video(encode_mp4(frames(3, (63, 47)), 24))
    assert decoded[0].size == (64, 48)


def test_encode_video_reports_the_padded_size_it_encoded() -> None:
    data, width, height = encode_video(frames(3, (63, 47)), 24)
    decoded, _ = decode_video(data)
    assert decoded[0].size == (width, height) == (64, 48)


def test_decode_video_scales_large_frames_down_to_the_output_size_as_it_decodes() -> None:
    data = encode_mp4(frames(4, (640, 480)), 24)
    decoded, fps = decode_video(data, max_pixels=64 * 48)
    assert fps == 24 and len(decoded) == 4
    assert {f.size for f in decoded} == {(64, 48)}
    # Frames already within the size stay as they are.
    assert {f.size for f in decode_video(data, max_pixels=640 * 480)[0]} == {(640, 480)}


def test_encode_mp4_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_mp4([], 24)
    with pytest.raises(ValueError):
        encode_mp4(frames(2), 0)
    with pytest.raises(ValueError):
        encode_mp4([*frames(1, (64, 48)), *frames(1, (32, 32))], 24)


@pytest.mark.parametrize(("seconds", "rate", "channels"), [(1.5, 16000, 1), (0.7, 44100, 2), (1.0, 22000, 1)])
def test_encode_mp4_with_audio_keeps_its_duration(seconds: float, rate: int, channels: int) -> None:
    # The video is 1 s; the audio is kept whole whether longer or shorter. 22000 Hz is not an AAC
    # rate and is resampled.
    data = encode_mp4(frames(24), 24, audio=wav_bytes(seconds, rate, channels))
    with av.open(io.BytesIO(data)) as c:
        assert len(c.streams.audio) == 1
        stream = c.streams.audio[0]
        assert stream.codec_context.name == "aac"
        assert stream.codec_context.layout.nb_channels == channels
        assert float(stream.duration * stream.time_base) == pytest.approx(seconds, abs=0.1)
        decoded = sum(frame.samples for frame in c.decode(stream)) / stream.codec_context.sample_rate
        assert decoded == pytest.approx(seconds, abs=0.1)
    info = check_video(data, max_frames=100, max_duration_s=10, max_side=1000)
    assert info.has_audio and info.frames == 24


def test_encode_mp4_refuses_non_audio() -> None:
    with pytest.raises(MediaError):
        encode_mp4(frames(2), 24, audio=GARBAGE)

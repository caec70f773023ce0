"""Input media a request refers to, decoded and checked before anything is queued.

A request names media as ``{"key": "uploads/..."}`` (already in our object store) or
``{"url": "https://..."}``; ``producer.inputs`` reads the bytes of either (URLs through the SSRF
guard of ``routing.io.net``). ``check_image``, ``check_video`` and ``check_audio`` decode them and
refuse what a worker could not use. Every refusal is a ``MediaError`` whose message says what is
wrong; the caller turns it into a ``FieldError`` naming the request field.

Decoding a video costs its source width x height per frame, whatever size a job later scales it
to: a ``DecodeBudget`` bounds what one request's videos may cost together. A container is
checked against it from its metadata before any frame is decoded, and every decoded frame is
counted against it, so a container whose metadata under-reports is stopped as it passes.

Untrusted bytes are opened by PyAV only with an explicit list of demuxers, so a
playlist format cannot make FFmpeg open files or URLs of its own.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import av
from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# FFmpeg demuxer names (av_match_list syntax). mov covers mp4/m4v/mov, matroska covers webm/mkv.
VIDEO_DEMUXERS = "mov,matroska"
AUDIO_DEMUXERS = "wav,mp3,flac"


class MediaError(Exception):
    """Media a request refers to cannot be used; the message says why."""


class DecodeBudgetError(MediaError):
    """Decoding the videos of one request would cost more than its ``DecodeBudget``."""


class DecodeBudget:
    """Pixels (width x height of each frame at its source size) the videos of one request may
    decode, all of them together."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.spent = 0

    def check(self, pixels: int, what: str) -> None:
        """Refuse ``what``, which would cost ``pixels``, before any of it is decoded."""
        if self.spent + pixels > self.max_pixels:
            raise DecodeBudgetError(f"{what}: {pixels} pixels to decode; {self._limit()}")

    def charge(self, pixels: int) -> None:
        """Count ``pixels`` decoded; refuse once they pass what the request may decode."""
        self.spent += pixels
        if self.spent > self.max_pixels:
            raise DecodeBudgetError(f"video decodes to more pixels than are left; {self._limit()}")

    def _limit(self) -> str:
        return (
            f"a request's videos may decode {self.max_pixels} pixels in all (width x height x frames, "
            "at the size they are stored): send smaller or shorter videos"
        )


# --- Decoding checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as displayed, after the EXIF orientation
    height: int
    format: str  # Pillow's name: "PNG", "JPEG", ...


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frames: int
    fps: float
    duration_s: float
    has_audio: bool


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    sample_rate: int
    channels: int
    codec: str  # FFmpeg's decoder name: "pcm_s16le", "mp3float", "flac", ...


def _file(data: bytes | BinaryIO) -> BinaryIO:
    """``data`` as a file read from its start: media is checked from bytes or from a file."""
    if isinstance(data, bytes | bytearray):
        return io.BytesIO(data)
    data.seek(0)
    return data


def check_image(data: bytes | BinaryIO, *, max_pixels: int, max_side: int) -> ImageInfo:
    """Decode ``data`` fully; refuse non-images, corrupt or truncated files, and large images."""
    try:
        # The size is in the header: refuse a decompression bomb before any pixel is decoded.
        with Image.open(_file(data), formats=IMAGE_FORMATS) as im:
            fmt, (width, height) = im.format or "?", im.size
            if width * height > max_pixels or max(width, height) > max_side:
                raise MediaError(
                    f"image is {width}x{height}; the limit is {max_pixels} pixels and {max_side} per side"
                )
            im.verify()  # checksums and structure; does not decode pixels for every format
        with Image.open(_file(data), formats=IMAGE_FORMATS) as im:
            im.load()  # decodes, so a truncated file fails here
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that turn by 90 degrees
                width, height = height, width
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"image is too large: {e}") from None
    except Exception as e:
        # Decoders of untrusted bytes fail in open-ended ways (OSError, SyntaxError, struct.error,
        # ...); whatever they raise, the file is what is wrong.
        raise MediaError(f"image is corrupt or truncated ({type(e).__name__}: {e})") from None
    return ImageInfo(width, height, fmt)


def open_container(data: bytes | BinaryIO, demuxers: str, what: str) -> av.container.InputContainer:
    """PyAV container over ``data``, probed only among ``demuxers`` (FFmpeg names, comma-separated).

    Shared with the worker, which decodes the same untrusted bytes later.
    """
    try:
        return av.open(_file(data), mode="r", options={"format_whitelist": demuxers})
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"not {what} ({type(e).__name__})") from None


def check_video(
    data: bytes | BinaryIO,
    *,
    max_frames: int,
    max_duration_s: float,
    max_side: int,
    budget: DecodeBudget | None = None,
) -> VideoInfo:
    """Decode every frame of ``data``'s first video stream; refuse what is too long or too large,
    or would cost more decoding than is left of ``budget`` (None: no bound but the frames')."""
    with open_container(data, VIDEO_DEMUXERS, "a video in a supported container (MP4/MOV, WebM/MKV)") as c:
        if not c.streams.video:
            raise MediaError("the file has no video stream")
        stream = c.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if max(width, height) > max_side:
            raise MediaError(f"video is {width}x{height}; the limit is {max_side} per side")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        declared = _declared_duration(c, stream)
        if declared is not None and declared > max_duration_s:
            raise MediaError(f"video is {declared:.2f} s long; the limit is {max_duration_s:.2f} s")
        declared_frames = _declared_frames(stream, declared, fps)
        if budget is not None and declared_frames is not None:
            # Decoding stops past max_frames whatever the metadata says: that is the most it costs.
            frames_to_decode = min(declared_frames, max_frames + 1)
            budget.check(
                width * height * frames_to_decode, f"video is {width}x{height} x {declared_frames} frames"
            )
        # Header values can lie; counting decoded frames cannot. Decoding also catches corruption.
        frames = 0
        try:
            for frame in c.decode(stream):
                frames += 1
                if budget is not None:
                    budget.charge(frame.width * frame.height)
                if frames > max_frames:
                    raise MediaError(f"video has more than {max_frames} frames")
                if max(frame.width, frame.height) > max_side:
                    raise MediaError(
                        f"video has a {frame.width}x{frame.height} frame; the limit is {max_side}"
                    )
        except av.FFmpegError as e:
            raise MediaError(f"video is corrupt ({type(e).__name__}: {e})") from None
        if frames == 0:
            raise MediaError("video has no decodable frames")
        duration = declared if declared is not None else (frames / fps if fps else 0.0)
        if duration > max_duration_s:
            raise MediaError(f"video is {duration:.2f} s long; the limit is {max_duration_s:.2f} s")
        return VideoInfo(width, height, frames, fps, duration, has_audio=bool(c.streams.audio))


def sample_frames(data: bytes | BinaryIO, count: int) -> list[Image.Image]:
    """``count`` frames of ``data``'s first video stream, evenly spaced from the first to the last
    (all of them when it has fewer), as RGB images. For the fleet's own outputs (previews): every
    frame is decoded, and only the chosen ones are converted."""
    with open_container(data, VIDEO_DEMUXERS, "a video in a supported container (MP4/MOV, WebM/MKV)") as c:
        if not c.streams.video:
            raise MediaError("the file has no video stream")
        stream = c.streams.video[0]
        total = stream.frames  # the MP4 header's count; 0 where the container does not say
        if not total:
            total = sum(1 for _ in c.decode(stream))
            c.seek(0)
        if total == 0:
            raise MediaError("video has no decodable frames")
        count = min(count, total)
        wanted = {round(i * (total - 1) / (count - 1)) if count > 1 else 0 for i in range(count)}
        frames = []
        try:
            for index, frame in enumerate(c.decode(stream)):
                if index in wanted:
                    frames.append(frame.to_image().convert("RGB"))
                    if len(frames) == len(wanted):
                        break
        except av.FFmpegError as e:
            raise MediaError(f"video is corrupt ({type(e).__name__}: {e})") from None
        if not frames:
            raise MediaError("video has no decodable frames")
        return frames


def check_audio(data: bytes | BinaryIO, *, max_duration_s: float) -> AudioInfo:
    """Decode ``data``'s first audio stream (WAV, MP3, FLAC); refuse non-audio and over-long audio."""
    with open_container(data, AUDIO_DEMUXERS, "audio in a supported format (WAV, MP3, FLAC)") as c:
        if not c.streams.audio:
            raise MediaError("the file has no audio stream")
        stream = c.streams.audio[0]
        rate = stream.codec_context.sample_rate
        if not rate:
            raise MediaError("audio has no sample rate")
        samples = 0
        try:
            for frame in c.decode(stream):
                samples += frame.samples
                if samples > max_duration_s * rate:
                    raise MediaError(f"audio is longer than the limit of {max_duration_s} s")
        except av.FFmpegError as e:
            raise MediaError(f"audio is corrupt ({type(e).__name__}: {e})") from None
        if samples == 0:
            raise MediaError("audio has no decodable samples")
        channels = stream.codec_context.layout.nb_channels
        return AudioInfo(samples / rate, rate, channels, stream.codec_context.name)


def _declared_frames(stream: av.video.stream.VideoStream, duration_s: float | None, fps: float) -> int | None:
    """Frames the container says its video stream has (MP4 counts them; Matroska gives a duration)."""
    if stream.frames:
        return stream.frames
    if duration_s is not None and fps:
        return round(duration_s * fps)
    return None


def _declared_duration(c: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if c.duration is not None:
        return c.duration / av.time_base
    return None

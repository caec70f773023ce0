"""Decoding input media for the pipelines, and encoding generated media into the bytes that go
to storage.

Inputs were checked by ``routing.io.media`` before the job was queued; they are decoded here with
the same format lists, since the bytes are still untrusted.
"""

from __future__ import annotations

import io
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

from routing.io.media import AUDIO_DEMUXERS, IMAGE_FORMATS, VIDEO_DEMUXERS, MediaError, open_container

# Sample rates AAC encodes; anything else is resampled to 48 kHz.
_AAC_RATES = {8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000}


# Output image formats: (key extension, content type).
IMAGE_OUTPUTS = {"png": ("png", "image/png"), "webp": ("webp", "image/webp"), "jpeg": ("jpg", "image/jpeg")}


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_image(image: Image.Image, output_format: str, quality: int | None = None) -> bytes:
    """``image`` as PNG, WebP or JPEG (``IMAGE_OUTPUTS``); ``quality`` (1-100) is for the lossy
    two. WebP at Pillow's default effort (method 4); JPEG with 4:2:0 chroma like most cameras,
    optimized Huffman tables (smaller, same pixels)."""
    if output_format == "png":
        return encode_png(image)
    if quality is None or not 1 <= quality <= 100:
        raise ValueError(f"{output_format} needs a quality from 1 to 100, got {quality!r}")
    buffer = io.BytesIO()
    if output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    else:
        raise ValueError(f"unknown image format {output_format!r}; known: {', '.join(IMAGE_OUTPUTS)}")
    return buffer.getvalue()


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono samples in [-1, 1] as a 16-bit PCM WAV."""
    import wave

    pcm = (np.clip(np.asarray(samples, dtype=np.float64), -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """RGB image, turned upright by its EXIF orientation; transparency is flattened onto white."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return im.convert("RGB")


def decode_video(data: bytes, *, max_pixels: int | None = None) -> tuple[list[Image.Image], float]:
    """Every frame of the first video stream as RGB, and the stream's frame rate.

    ``max_pixels`` (the job's output size): a larger frame is scaled down to it, aspect kept, as
    it is decoded, so the list holds no more than the submit check counted
    (``producer.inputs.InputLimits.video_max_pixels``), however large the file's frames are.
    """
    with open_container(data, VIDEO_DEMUXERS, "a video in a supported container") as c:
        if not c.streams.video:
            raise MediaError("the file has no video stream")
        stream = c.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frames = [_fit(frame, max_pixels) for frame in c.decode(stream)]
        return frames, float(rate) if rate else 0.0


def _fit(frame: av.VideoFrame, max_pixels: int | None) -> Image.Image:
    width, height = frame.width, frame.height
    if max_pixels is None or width * height <= max_pixels:
        return frame.to_image()
    scale = (max_pixels / (width * height)) ** 0.5
    # FFmpeg's scaler goes straight from the decoder's YUV to a small RGB frame: the full-size
    # RGB image is never made.
    size = max(1, int(width * scale)), max(1, int(height * scale))
    return frame.to_image(width=size[0], height=size[1], interpolation="AREA")


def decode_audio(
    data: bytes, *, sample_rate: int | None = None, layout: str | None = None
) -> tuple[np.ndarray, int]:
    """Samples of the first audio stream as float32 ``(channels, n)`` in [-1, 1], and their rate.

    ``sample_rate`` and ``layout`` ("mono", "stereo") resample; None keeps the file's.
    """
    with open_container(data, AUDIO_DEMUXERS, "audio in a supported format (WAV, MP3, FLAC)") as c:
        if not c.streams.audio:
            raise MediaError("the file has no audio stream")
        ctx = c.streams.audio[0].codec_context
        rate = sample_rate or ctx.sample_rate
        resampler = av.AudioResampler(format="fltp", layout=layout or ctx.layout.name, rate=rate)
        chunks = [
            out.to_ndarray()
            for frame in [*c.decode(audio=0), None]  # None flushes the resampler
            for out in resampler.resample(frame)
        ]
    if not chunks:
        raise MediaError("audio has no decodable samples")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate


def encode_mp4(
    frames: list[Image.Image],
    fps: int,
    audio: bytes | None = None,
    *,
    crf: int = 18,
    preset: str = "medium",
) -> bytes:
    """H.264 (yuv420p) MP4 at exactly ``fps``, moov atom first so browsers play it while loading.

    yuv420p needs even sizes: an odd width or height is padded by one pixel that repeats the
    last column or row, so the output is up to one pixel larger than the frames.

    ``audio`` (WAV, MP3 or FLAC bytes) is muxed as AAC and kept whole, NOT trimmed to the video:
    speech is never cut, and when it outlasts the frames players hold the last frame.
    """
    if not frames:
        raise ValueError("no frames to encode")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps <= 0:
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    width, height = frames[0].size
    if any(f.size != (width, height) for f in frames):
        raise ValueError("all frames must have the same size")
    pad = ((0, height % 2), (0, width % 2), (0, 0))

    # The mov muxer's faststart pass reopens its output by name, which an in-memory buffer
    # (PyAV's BytesIO output) does not have: encode into a temporary file.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.mp4"
        # The mov muxer picks a timescale of its own (1/12288 at 24 fps) unless told; 1/fps
        # makes every frame exactly one tick.
        with av.open(
            str(path),
            mode="w",
            format="mp4",
            options={"movflags": "+faststart", "video_track_timescale": str(fps)},
        ) as out:
            video = out.add_stream("libx264", rate=fps)
            video.width, video.height = width + width % 2, height + height % 2
            video.pix_fmt = "yuv420p"
            video.codec_context.time_base = Fraction(1, fps)
            video.options = {"crf": str(crf), "preset": preset}
            # Streams are added before any encoding: the header is written at the first mux.
            sound = _add_audio(out, audio) if audio is not None else None

            packets = []
            for i, image in enumerate(frames):
                pixels = np.pad(np.asarray(image.convert("RGB")), pad, mode="edge")
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, fps)
                packets += video.encode(frame)
            packets += video.encode(None)
            if sound is not None:
                packets += sound
            # Interleave by time, so a player reading from the front finds both streams together.
            packets.sort(key=lambda p: p.dts * p.time_base if p.dts is not None else 0)
            for packet in packets:
                out.mux(packet)
        return path.read_bytes()


def encode_video(
    frames: list[Image.Image], fps: int, audio: bytes | None = None, crf: int = 18
) -> tuple[bytes, int, int]:
    """``encode_mp4`` at ``crf``, and the width and height of the video it made: an odd size is
    padded by one pixel."""
    data = encode_mp4(frames, fps, audio=audio, crf=crf)
    width, height = frames[0].size
    return data, width + width % 2, height + height % 2


def _add_audio(out: av.container.OutputContainer, audio: bytes) -> list[av.Packet]:
    """Add an AAC stream to ``out`` and return its encoded packets (muxed by the caller)."""
    samples, rate = decode_audio(audio)
    if rate not in _AAC_RATES or samples.shape[0] > 2:
        samples, rate = decode_audio(
            audio,
            sample_rate=rate if rate in _AAC_RATES else 48000,
            layout="stereo" if samples.shape[0] > 1 else "mono",
        )
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    stream = out.add_stream("aac", rate=rate, layout=layout)
    stream.codec_context.bit_rate = 96_000 if layout == "mono" else 160_000
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
    # PyAV splits the frame into the encoder's 1024-sample frames itself.
    return [*stream.encode(frame), *stream.encode(None)]

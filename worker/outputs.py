"""A job's outputs as files: each shape of ``Generated`` encoded, then stored or written.

The one place that branches over the shapes: ``encode`` turns images into PNG, WebP or JPEG
files, a video's frames into an H.264 MP4 (with its audio muxed in), and keeps an MP4 already
encoded as it is. The runner stores the files under the job's keys (``store``); a multi-GPU
group's rank 0 writes them into the job's directory for the supervisor (``write``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routing.io.storage import Storage, output_key
from routing.jobs.record import Output
from worker.adapters.base import EncodedVideo, Generated, Images, Video


@dataclass(frozen=True)
class Encoding:
    """How outputs are encoded: the request's output fields, or the defaults where it has none."""

    image_format: str = "png"  # a key of ``worker.media.IMAGE_OUTPUTS``
    image_quality: int | None = None  # the lossy formats' 1-100
    video_crf: int = 18

    @classmethod
    def of(cls, request: Any) -> Encoding:
        """The encoding ``request`` asks for; a request without output fields (speech-to-video)
        gets the defaults."""
        from routing.schemas import ImageOutputFields, VideoOutputFields

        if isinstance(request, ImageOutputFields):
            return cls(image_format=request.output_format, image_quality=request.output_quality)
        if isinstance(request, VideoOutputFields):
            return cls(video_crf=request.video_crf)
        return cls()


@dataclass(frozen=True)
class OutputFile:
    """One encoded output and what the job's record says of it."""

    ext: str
    content_type: str
    data: bytes
    width: int
    height: int
    seed: int | None = None
    cache: str | None = None
    frames: int | None = None  # a video's
    fps: int | None = None


def encode(generated: Generated, encoding: Encoding = Encoding()) -> list[OutputFile]:
    """``generated`` as files, one per output."""
    from worker.media import IMAGE_OUTPUTS, encode_image, encode_video

    if isinstance(generated, EncodedVideo):
        return [
            OutputFile(
                "mp4",
                "video/mp4",
                generated.data,
                generated.width,
                generated.height,
                seed=generated.seed,
                cache=generated.cache,
                frames=generated.frame_count,
                fps=generated.fps,
            )
        ]
    if isinstance(generated, Video):
        data, width, height = encode_video(
            generated.frames, generated.fps, audio=generated.audio, crf=encoding.video_crf
        )
        return [
            OutputFile(
                "mp4",
                "video/mp4",
                data,
                width,
                height,
                seed=generated.seed,
                cache=generated.cache,
                frames=len(generated.frames),
                fps=generated.fps,
            )
        ]
    if isinstance(generated, Images):
        ext, content_type = IMAGE_OUTPUTS[encoding.image_format]
        seeds = generated.seeds or [generated.seed] * len(generated.images)
        return [
            OutputFile(
                ext,
                content_type,
                encode_image(image, encoding.image_format, encoding.image_quality),
                image.width,
                image.height,
                seed=seed,
                cache=generated.cache,
            )
            for image, seed in zip(generated.images, seeds, strict=True)
        ]
    raise TypeError(f"not a generated output: {type(generated).__name__}")


def store(
    storage: Storage,
    job_id: str,
    attempt: int,
    generated: Generated,
    encoding: Encoding,
    timings: dict[str, float],
) -> list[Output]:
    """Encode ``generated`` and store it under this attempt's keys; what the job's record lists.
    Adds ``encode_s`` and ``store_s`` to ``timings``."""
    t0 = time.perf_counter()
    files = encode(generated, encoding)
    timings["encode_s"] = round(time.perf_counter() - t0, 4)
    t0 = time.perf_counter()
    outputs = []
    for index, file in enumerate(files):
        stored = storage.put(output_key(job_id, attempt, index, file.ext), file.data, file.content_type)
        video = {"frames": file.frames, "fps": file.fps} if file.frames else {}
        outputs.append(
            Output(
                stored.key,
                file.content_type,
                stored.size_bytes,
                file.width,
                file.height,
                seed=file.seed,
                cache=file.cache,
                **video,
            )
        )
    timings["store_s"] = round(time.perf_counter() - t0, 4)
    return outputs


def write(files: list[OutputFile], directory: Path) -> list[Path]:
    """``files`` in ``directory``: ``output.mp4`` for a video, ``output-<n>.<ext>`` for images."""
    paths = []
    for index, file in enumerate(files):
        name = "output.mp4" if file.frames is not None else f"output-{index}.{file.ext}"
        path = directory / name
        path.write_bytes(file.data)
        paths.append(path)
    return paths

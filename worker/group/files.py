"""The files a job's inputs and outputs cross between the supervisor and the ranks in.

Inputs go to the ranks as the bytes the store holds (checked at submit), one file each in the
job's directory, never re-encoded; each rank decodes them itself, as the runner does. Rank 0
writes the output there (an MP4 with the speech muxed in, or PNGs; ``worker.outputs`` encodes
them) and the supervisor reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.adapters.base import EncodedVideo, Generated, Images, Inputs
from worker.group.protocol import ImagesResult, Result, VideoResult


def write_inputs(inputs: Inputs, jobdir: Path) -> dict[str, Any]:
    """Supervisor: each input field's stored bytes as a file in ``jobdir``; field -> path (a list
    of paths for a list field)."""
    from routing.schemas import AUDIO_FIELDS

    stored = getattr(inputs, "stored", None)
    if stored is None:
        raise TypeError("the group reads inputs as they were stored: pass an Inputs made by Inputs.decode")
    files: dict[str, Any] = {}
    for name, data in stored.items():
        if isinstance(data, list):
            paths = []
            for index, item in enumerate(data):
                path = jobdir / f"{name}.{index}"
                path.write_bytes(item)
                paths.append(str(path))
            files[name] = paths
        else:
            path = jobdir / (f"{name}.{_audio_extension(data)}" if name in AUDIO_FIELDS else name)
            path.write_bytes(data)
            files[name] = str(path)
    return files


def _audio_extension(data: bytes) -> str:
    if data[:4] == b"RIFF":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    return "mp3"


def read_inputs(
    files: dict[str, Any], job_id: str | None = None, max_video_pixels: int | None = None
) -> Inputs:
    """Rank: the inputs a single-GPU adapter takes, decoded from the stored bytes as the runner
    decodes them."""
    stored = {
        name: [Path(p).read_bytes() for p in value] if isinstance(value, list) else Path(value).read_bytes()
        for name, value in files.items()
    }
    return Inputs.decode(stored, job_id=job_id, max_video_pixels=max_video_pixels)


def upright_images(files: dict[str, Any], jobdir: Path, rank: int) -> dict[str, Any]:
    """Rank: ``files`` for a group model, which opens its inputs by path: each single image is
    decoded as the runner decodes it (upright by its EXIF orientation, transparency on white) and
    handed over as a lossless PNG; speech and video stay the stored bytes."""
    from routing.schemas import AUDIO_FIELDS, VIDEO_FIELDS
    from worker.media import decode_image, encode_png

    upright = dict(files)
    for name, value in files.items():
        if isinstance(value, list) or name in AUDIO_FIELDS or name in VIDEO_FIELDS:
            continue
        path = jobdir / f"{name}.rank{rank}.png"  # the ranks share the job's directory
        path.write_bytes(encode_png(decode_image(Path(value).read_bytes())))
        upright[name] = str(path)
    return upright


def write_output(generated: Generated | None, job_id: str, jobdir: Path, crf: int = 18) -> Result:
    """Rank 0: the job's output as files in ``jobdir``, and what the supervisor records of it.
    Images cross as lossless PNGs: the runner encodes them in the request's format."""
    from worker import outputs

    if generated is None:
        raise RuntimeError("rank 0's model returned nothing")
    written = outputs.encode(generated, outputs.Encoding(video_crf=crf))
    paths = outputs.write(written, jobdir)
    if isinstance(generated, Images):
        return ImagesResult(
            job_id=job_id,
            paths=[str(path) for path in paths],
            seed=generated.seed,
            seeds=generated.seeds,
            cache=generated.cache,
        )
    (video,) = written
    return VideoResult(
        job_id=job_id,
        path=str(paths[0]),
        width=video.width,
        height=video.height,
        frame_count=video.frames,
        fps=video.fps,
        seed=video.seed,
        cache=video.cache,
        timings=dict(getattr(generated, "timings", {})),
    )


def read_output(result: Result) -> Generated:
    """Supervisor: what rank 0 wrote, as the runner stores it."""
    from worker.media import decode_image

    if isinstance(result, ImagesResult):
        images = [decode_image(Path(p).read_bytes()) for p in result.paths]
        return Images(images, seed=result.seed, seeds=result.seeds, cache=result.cache)
    return EncodedVideo(
        Path(result.path).read_bytes(),
        width=result.width,
        height=result.height,
        frame_count=result.frame_count,
        fps=result.fps,
        seed=result.seed,
        cache=result.cache,
        timings=dict(result.timings),
    )

"""A video's previews, which OpenAI's Videos API serves beside the MP4
(``GET /v1/videos/{id}/content?variant=thumbnail|spritesheet``):

- ``thumbnail``: the first frame, at the video's size, as a WebP;
- ``spritesheet``: ``SHEET_FRAMES`` frames evenly spaced from the first to the last (all of them
  for a shorter video), each scaled down to at most ``SHEET_TILE`` pixels on its longer side, left
  to right in rows of ``SHEET_COLUMNS`` (fewer columns for fewer frames), as one JPEG.

Each is made from the stored video the first time it is asked for, and stored beside it
(``<output key>.<variant>.<ext>``, under the job's ``jobs/<id>/`` folder): it is kept as long as the
video (``FLEET_RETENTION_OUTPUTS_DAYS``, the bucket's ``jobs/`` rule) and deleted with it
(``Client.delete`` deletes the job's whole folder).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image

from routing.io.media import sample_frames
from routing.io.storage import ObjectNotFound, Storage

SHEET_FRAMES = 16
SHEET_COLUMNS = 4
SHEET_TILE = 256


@dataclass(frozen=True)
class Preview:
    variant: str
    ext: str
    content_type: str


PREVIEWS = {
    "thumbnail": Preview("thumbnail", "webp", "image/webp"),
    "spritesheet": Preview("spritesheet", "jpg", "image/jpeg"),
}


def preview_key(video_key: str, preview: Preview) -> str:
    return f"{video_key}.{preview.variant}.{preview.ext}"


def preview(storage: Storage, video_key: str, variant: str) -> tuple[bytes, Preview]:
    """The ``variant`` of the stored video ``video_key``: read from the store, or made and stored
    there the first time. Two first requests at once both make it; the second write is the same
    bytes."""
    kind = PREVIEWS[variant]
    key = preview_key(video_key, kind)
    try:
        return storage.get(key), kind
    except ObjectNotFound:
        pass
    video = storage.get(video_key)
    data = thumbnail(video) if variant == "thumbnail" else spritesheet(video)
    storage.put(key, data, kind.content_type)
    return data, kind


def thumbnail(video: bytes) -> bytes:
    [first] = sample_frames(video, 1)
    out = io.BytesIO()
    first.save(out, format="WEBP", quality=90)
    return out.getvalue()


def spritesheet(video: bytes) -> bytes:
    frames = sample_frames(video, SHEET_FRAMES)
    width, height = frames[0].size
    scale = min(1.0, SHEET_TILE / max(width, height))
    tile = (max(1, round(width * scale)), max(1, round(height * scale)))
    columns = min(SHEET_COLUMNS, len(frames))
    rows = math.ceil(len(frames) / columns)
    sheet = Image.new("RGB", (columns * tile[0], rows * tile[1]))
    for index, frame in enumerate(frames):
        place = ((index % columns) * tile[0], (index // columns) * tile[1])
        sheet.paste(frame.resize(tile, Image.Resampling.LANCZOS), place)
    out = io.BytesIO()
    sheet.save(out, format="JPEG", quality=85)
    return out.getvalue()

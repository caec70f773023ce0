"""Encoding generated media into the bytes that go to storage."""

from __future__ import annotations

import io

from PIL import Image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

"""Small Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-2509."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

VERSION = 1

BUILDERS: dict[str, Callable[[Path], None]] = {}

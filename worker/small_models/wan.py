"""Small Wan2.2 TI2V-5B and Animate-14B."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

VERSION = 1

BUILDERS: dict[str, Callable[[Path], None]] = {}

"""A module attribute of the official code replaced, and the checks that it still exists."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any


class OfficialCodeMismatch(ImportError):
    """The installed ``wan22`` is not the code these patches were written against."""


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Patch:
    """``module.attribute`` becomes ``replace(original)``, for the reason ``why``; only ``when()``."""

    module: str
    attribute: str
    replace: Callable[[Any], Any]
    why: str
    when: Callable[[], bool] = _always

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attribute}"


def instead(value: Any) -> Callable[[Any], Any]:
    """A ``Patch.replace`` that ignores the original."""
    return lambda _original: value


def missing(patches: Iterable[Patch]) -> list[str]:
    """The targets of ``patches`` whose module is not imported or has no such attribute."""
    return [
        p.target
        for p in patches
        if p.module not in sys.modules or not hasattr(sys.modules[p.module], p.attribute)
    ]


def apply(patches: Iterable[Patch]) -> None:
    """Replace each attribute for the life of the process."""
    for p in patches:
        if p.when():
            module = sys.modules[p.module]
            setattr(module, p.attribute, p.replace(getattr(module, p.attribute)))


@contextlib.contextmanager
def patched(patches: Iterable[Patch]) -> Iterator[None]:
    """Replace each attribute while the block runs, and put the originals back after it."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for p in patches:
            if p.when():
                module = sys.modules[p.module]
                original = getattr(module, p.attribute)
                saved.append((module, p.attribute, original))
                setattr(module, p.attribute, p.replace(original))
        yield
    finally:
        for module, attribute, original in reversed(saved):
            setattr(module, attribute, original)

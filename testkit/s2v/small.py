"""Small random-weight checkpoints (``testkit.small_models.s2v``): T5 and VAE sizes from the
checkpoint, only while one loads, and the area a frame is rendered at, at most.

The official code hard-codes the sizes of T5 (``umt5_xxl``) and the VAE (``_video_vae``); both
take them as keyword overrides. A small checkpoint writes its sizes, and the area it renders at
most, in ``SMALL_MODEL_FILE``; a real checkpoint has none, and loads with nothing replaced.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from worker.adapters.wan_s2v.patch import Patch, patched

# Written by the small-model builder.
SMALL_MODEL_FILE = "fleet-small-model.json"


def _with_sizes(sizes: dict[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(build: Callable[..., Any]) -> Callable[..., Any]:
        def build_small(*args: Any, **kwargs: Any) -> Any:
            return build(*args, **{**kwargs, **sizes})

        return build_small

    return wrap


def patches(sizes: dict[str, Any]) -> tuple[Patch, ...]:
    """``sizes`` (a ``SMALL_MODEL_FILE``'s contents) given to the builders of T5 and the VAE."""
    return (
        Patch(
            "wan.modules.t5",
            "umt5_xxl",
            _with_sizes(sizes.get("t5", {})),
            "T5EncoderModel builds umt5_xxl at the full model's sizes",
        ),
        Patch(
            "wan.modules.vae2_1",
            "_video_vae",
            _with_sizes(sizes.get("vae", {})),
            "Wan2_1_VAE builds _video_vae at the full model's sizes",
        ),
    )


@contextlib.contextmanager
def small_model_sizes(checkpoint_dir: str | Path) -> Iterator[dict[str, Any] | None]:
    """While loading ``checkpoint_dir``: its sizes if it is a small checkpoint (T5 and the VAE
    are built at them), else None."""
    from worker.adapters.wan_s2v.official import import_wan_modules

    path = Path(checkpoint_dir) / SMALL_MODEL_FILE
    sizes = json.loads(path.read_text()) if path.is_file() else None
    if not sizes:
        yield None
        return
    import_wan_modules()
    with patched(patches(sizes)):
        yield sizes

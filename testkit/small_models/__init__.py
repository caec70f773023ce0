"""Build small random-weight copies of the catalog's pipelines.

Each builder uses the real diffusers/transformers classes and writes a normal diffusers
repo layout with ``save_pretrained``, so the worker loads it with the very same
``from_pretrained(path)`` call it uses for real weights. Used by tests, the demo and the
benchmarks on machines with no GPU and no model hub access.

Several processes may build into the same directory at once (the suite's parallel workers, a
demo beside them): a build holds an exclusive lock on ``.<dir>.lock`` beside the directory, and
each model is written to a temporary directory and renamed into place.

    python -m testkit.small_models --out DIR [--models z-image-turbo ...] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER = ".small-model-complete"

# One module per model family; each has ``VERSION`` (bump it whenever its builders change what
# they write, so directories built by an older builder are rebuilt) and ``BUILDERS``
# (model key -> function that writes the model into a directory).
_FAMILIES = ("z_image", "qwen_image", "wan", "s2v", "a14b_official")


def _families() -> dict[str, tuple[int, Callable[[Path], None]]]:
    found: dict[str, tuple[int, Callable[[Path], None]]] = {}
    for name in _FAMILIES:
        module = importlib.import_module(f"testkit.small_models.{name}")
        for key, function in module.BUILDERS.items():
            found[key] = (module.VERSION, function)
    return found


BUILDERS: dict[str, tuple[int, Callable[[Path], None]]] = _families()


def _builder(key: str) -> tuple[int, Callable[[Path], None]]:
    return BUILDERS[key]


def is_complete(model_dir: Path, key: str) -> bool:
    """True if ``model_dir`` holds a finished build of ``key`` by the current builder."""
    try:
        json.loads((model_dir / "model_index.json").read_text())
        return (model_dir / MARKER).read_text().strip() == str(_builder(key)[0])
    except (OSError, ValueError):
        return False


def _build_one(key: str, out_dir: Path) -> None:
    target = out_dir / key
    # Same filesystem as the target so the final rename is atomic: a killed build leaves
    # only a hidden temp dir, never a half model under the model's own name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=out_dir))
    try:
        version, build_model = _builder(key)
        build_model(tmp)
        (tmp / MARKER).write_text(f"{version}\n")
        if target.exists():
            old = target.with_name(f".{key}.old-{os.getpid()}")
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold the build lock of ``out_dir``: one builder at a time, the others wait and then find
    the models complete. Beside the directory, so the directory holds only models."""
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(out_dir: Path, models: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Build each model (all by default) into ``out_dir/<key>``; return key -> directory."""
    out_dir = Path(out_dir)
    keys = list(BUILDERS) if models is None else list(models)
    unknown = [k for k in keys if k not in BUILDERS]
    if unknown:
        raise ValueError(f"no small-model builder for {unknown}; known: {sorted(BUILDERS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        return _build_all(out_dir, keys, force)


def _build_all(out_dir: Path, keys: list[str], force: bool) -> dict[str, Path]:
    built: dict[str, Path] = {}
    for key in keys:
        start = time.perf_counter()
        target = out_dir / key
        if not force and is_complete(target, key):
            state = "already present"
        else:
            _build_one(key, out_dir)
            state = "built"
        print(f"{key}: {state} in {time.perf_counter() - start:.1f}s -> {target}", flush=True)
        built[key] = target
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.small_models", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory that receives one folder per model"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(BUILDERS), help="model keys (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build is present")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the output to one line per model
    build(args.out, args.models, force=args.force)
    return 0

"""A stand-in for the GPU in bench/gpu_busy.py: it holds "the device" by sleeping for the time a
pipeline call would take, reporting every step, and returns full-size outputs for the worker to
encode and store (a 1024x1024 image, or the 1280x704 frames of a video) at the request's size.

How long it holds the device is in the prompt: ``hold=1.0`` (seconds). Loaded in the worker
through ``settings.adapters`` for the models the benchmark runs.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
from PIL import Image

from routing.catalog import ModelSpec
from worker.adapters.base import (
    Adapter,
    Capabilities,
    Generated,
    Images,
    Inputs,
    Runtime,
    StepCallback,
    Video,
)

SLEEP_ADAPTER = "bench.sleep_adapter:SleepAdapter"


def _texture(width: int, height: int, shift: int, seed: int = 0) -> Image.Image:
    """A picture with gradients, edges and grain: as hard to compress as a generated one, not
    as easy as a flat colour or as hopeless as pure noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x = x + 4 * shift
    base = np.stack(
        [
            127 + 80 * np.sin(x / 37.0) * np.cos(y / 53.0),
            127 + 80 * np.sin((x + y) / 71.0),
            127 + 60 * np.cos(x / 23.0 + y / 41.0),
        ],
        axis=-1,
    )
    grain = np.random.default_rng(seed + shift).normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


class SleepAdapter(Adapter):
    capabilities = Capabilities()  # base jobs only: nothing to compile, no LoRAs

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        super().__init__(spec, weights, runtime)
        self._outputs: dict[tuple[int, int, int], list[Image.Image]] = {}

    def _made(self, width: int, height: int, frames: int) -> list[Image.Image]:
        # Made once per shape and handed out again: making them is not the GPU's work either.
        key = (width, height, frames)
        if key not in self._outputs:
            self._outputs[key] = [_texture(width, height, i) for i in range(max(frames, 1))]
        return self._outputs[key]

    def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Generated:
        match = re.search(r"\bhold=([0-9.]+)", request.prompt)
        hold_s = float(match.group(1)) if match else 1.0
        steps = request.steps or 1
        for step in range(1, steps + 1):
            time.sleep(hold_s / steps)
            on_step(step, steps)
        frames = getattr(request, "frames", None)
        if frames:
            return Video(self._made(request.width, request.height, frames), fps=24, seed=0)
        return Images(self._made(request.width, request.height, 1), seed=0)

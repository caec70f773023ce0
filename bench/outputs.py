"""Several outputs per job, and the cost of each output format. CPU, small models, one run.

    python bench/outputs.py [--repeats 3]

1. Four images: one job of ``num_outputs=4`` against four jobs of one, through the adapter in
   this process (the pipeline resident, no queue), on the small Z-Image and Qwen-Image. Beside
   them, what one batched pipeline call (``num_images_per_prompt=4``, a generator per image)
   would take, and how many pixel values of its images differ from the same seeds made alone:
   why the fleet makes each output in a call of its own.
2. Encoding: PNG, WebP and JPEG (quality 90, the default) of a full-size random image at
   1024x1024 and 1280x704, with ``worker.media.encode_image``: seconds and bytes, and each
   against PNG. Random pixels are the worst case for every format.

Figures are CPU figures; they say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routing.catalog import CATALOG
from testkit.small_models import build
from worker.adapters.base import Runtime
from worker.adapters.qwen_image import QwenImageAdapter
from worker.adapters.z_image import ZImageAdapter
from worker.media import encode_image

MODELS = {"z-image-turbo": ZImageAdapter, "qwen-image": QwenImageAdapter}
SEED = 100


def median_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def request(key: str, num_outputs: int, seed: int) -> SimpleNamespace:
    spec = CATALOG[key]
    return SimpleNamespace(
        prompt="a red fox in snow",
        negative_prompt=None,
        width=256,
        height=256,
        steps=4,
        guidance_scale=spec.default_guidance,
        seed=seed,
        num_outputs=num_outputs,
        cache=None,
    )


def batched_call(adapter: Any, key: str) -> list[Image.Image]:
    """One pipeline call for four images: what the fleet does not do (see the module docstring)."""
    import torch

    r = request(key, 4, SEED)
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(4)]
    extra = (
        {"true_cfg_scale": r.guidance_scale, "negative_prompt": " "}
        if key == "qwen-image"
        else {"guidance_scale": r.guidance_scale}
    )
    out = adapter.pipe(
        prompt=r.prompt,
        width=r.width,
        height=r.height,
        num_inference_steps=r.steps,
        num_images_per_prompt=4,
        generator=generators,
        **extra,
    )
    return list(out.images)


def outputs_section(models_dir: Path, repeats: int) -> None:
    import torch

    runtime = Runtime(device="cpu", dtype=torch.float32)
    print("1. four images, 256x256, 4 steps (CPU, in-process, median of", repeats, "runs)")
    print(
        f"   {'model':<15} {'4 jobs of 1':>12} {'1 job of 4':>11} {'ratio':>6} {'batched call':>13} {'ratio':>6}  batched vs alone"
    )
    for key, adapter_class in MODELS.items():
        adapter = adapter_class(CATALOG[key], str(models_dir / key), runtime)
        compare(key, adapter, repeats)


def compare(key: str, adapter: Any, repeats: int) -> None:
    def quiet(done: int, total: int) -> None:
        pass

    adapter.run(request(key, 1, SEED), {}, quiet)  # warm-up
    separate = median_s(
        lambda: [adapter.run(request(key, 1, SEED + i), {}, quiet) for i in range(4)], repeats
    )
    one_job = median_s(lambda: adapter.run(request(key, 4, SEED), {}, quiet), repeats)
    batched = median_s(lambda: batched_call(adapter, key), repeats)
    alone = adapter.run(request(key, 4, SEED), {}, quiet).images
    together = batched_call(adapter, key)
    differ = sum(int((np.asarray(a) != np.asarray(b)).sum()) for a, b in zip(alone, together, strict=True))
    print(
        f"   {key:<15} {separate:>11.3f}s {one_job:>10.3f}s {one_job / separate:>6.2f}"
        f" {batched:>12.3f}s {batched / separate:>6.2f}  {differ} of {4 * 256 * 256 * 3} values differ"
    )


def encode_section(repeats: int) -> None:
    print(f"2. encoding a random image (CPU, median of {repeats} runs; ratios against PNG)")
    print(f"   {'size':<10} {'format':<6} {'seconds':>8} {'ratio':>6} {'bytes':>10} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for width, height in ((1024, 1024), (1280, 704)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        base_s = base_bytes = 0.0
        for output_format, quality in (("png", None), ("webp", 90), ("jpeg", 90)):
            seconds = median_s(lambda: encode_image(image, output_format, quality), repeats)  # noqa: B023
            size = len(encode_image(image, output_format, quality))
            if output_format == "png":
                base_s, base_bytes = seconds, size
            print(
                f"   {width}x{height:<5} {output_format:<6} {seconds:>8.3f} {seconds / base_s:>6.2f}"
                f" {size:>10,} {size / base_bytes:>6.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", type=Path, default=ROOT / "var" / "small-models")
    args = parser.parse_args()
    build(args.models, list(MODELS))
    outputs_section(args.models, args.repeats)
    encode_section(args.repeats)


if __name__ == "__main__":
    main()

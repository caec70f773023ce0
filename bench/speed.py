"""Speed of the fast paths on the small models, each against its baseline measured in the same run.

    python bench/speed.py [--only compile lora outputs encode] [--repeats 5]

CPU figures on random weights: they show the mechanism works and what it costs here, nothing about
a GPU (there, bench/gpu_speed.py) and nothing about image quality.

Sections, each independent (``--only`` picks some):

- ``compile``: small Z-Image 128x128, eager against the regional-compile profile (inductor on
  the CPU), seconds a denoising step: (job at 10 steps - job at 2 steps) / 8, median of repeats.
  The one-off compile and warm-up time is printed apart.
- ``lora``: small Z-Image 64x64, 2 steps, one rank-4 LoRA per job: the fleet's hotswap into the
  resident slot (apply, run, zero the slot) against diffusers' load-and-unload a job
  (``load_lora_weights``, run, ``unload_lora_weights``); the LoRA's cost a job beyond the plain
  job, and the ratio of whole jobs.
- ``outputs``: one job of four outputs against four jobs of one, and what one batched pipeline
  call would take (``bench/outputs.py``, which also runs alone).
- ``encode``: PNG against WebP and JPEG at 1024x1024 and 1280x704 (``bench/outputs.py``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "z-image-turbo"


def _adapter(settings: Any) -> tuple[Any, Any]:
    import torch

    from routing.catalog import CATALOG
    from worker.adapters.base import Runtime
    from worker.adapters.z_image import ZImageAdapter
    from worker.speed import prepare

    spec = CATALOG[MODEL]
    adapter = ZImageAdapter(spec, str(ROOT / "var" / "small-models" / MODEL), Runtime("cpu", torch.float32))
    return adapter, prepare(adapter, spec, spec.vram_class, settings)


def _request(width: int, height: int, steps: int, **extra: Any) -> Any:
    from routing.schemas import parse_request

    data = {
        "model": MODEL,
        "prompt": "a red fox",
        "width": width,
        "height": height,
        "steps": steps,
        "seed": 1,
    }
    return parse_request(data | extra)


def _median_s(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compile_section(repeats: int, work: Path) -> None:
    from routing.settings import Settings

    def per_step_s(adapter: Any) -> float:
        def job(steps: int) -> Callable[[], object]:
            return lambda: adapter.run(_request(128, 128, steps), {}, lambda step, total: None)

        return (_median_s(job(10), repeats) - _median_s(job(2), repeats)) / 8

    base = Settings(
        max_loras=0, lora_cache_dir=work / "cache", warm_sizes={MODEL: [(64, 64, 0), (128, 128, 0)]}
    )
    eager, _ = _adapter(base.model_copy(update={"compile_profile": "eager"}))
    started = time.perf_counter()
    compiled, speed = _adapter(base.model_copy(update={"compile_profile": "compile"}))
    compile_s = time.perf_counter() - started
    eager_s, compiled_s = per_step_s(eager), per_step_s(compiled)
    print("compile: small Z-Image 128x128 on the CPU (inductor), random weights; not a GPU figure")
    print(f"  eager           {eager_s * 1000:8.1f} ms a step")
    print(f"  regional compile{compiled_s * 1000:8.1f} ms a step   ratio {compiled_s / eager_s:.2f} of eager")
    print(f"  compile and warm-up at load, once: {compile_s:.1f} s ({len(speed.warmed)} sizes)")


def lora_section(repeats: int, work: Path) -> None:
    from routing.io.storage import LocalStorage
    from routing.settings import Settings
    from testkit.small_models.lora import build_lora
    from worker.speed import job_context

    lora = build_lora(ROOT / "var" / "small-models" / MODEL, MODEL, work / "style.safetensors")
    storage = LocalStorage(work / "objects")
    import hashlib

    key = f"loras/{hashlib.sha256(lora.read_bytes()).hexdigest()}.safetensors"
    storage.put(key, lora.read_bytes(), "application/octet-stream")
    settings = Settings(compile_profile="eager", lora_cache_dir=work / "cache", lora_max_rank=16)
    fleet, _ = _adapter(settings)
    stock, _ = _adapter(settings.model_copy(update={"max_loras": 0}))  # no slot: plain diffusers
    plain = _request(64, 64, 2)
    styled = _request(64, 64, 2, loras=[{"source": key, "scale": 1.0}])

    def hotswap_job() -> None:
        with job_context(fleet, styled, storage, {}):
            fleet.run(styled, {}, lambda step, total: None)

    def reload_job() -> None:
        stock.pipe.load_lora_weights(str(lora), adapter_name="job")
        stock.run(plain, {}, lambda step, total: None)
        stock.pipe.unload_lora_weights()

    def hotswap_only() -> None:  # what a job adds: cache lookup, merge, swap in, zero after
        fleet.speed.slot.apply([(str(fleet.speed.cache.path(key, storage)), 1.0)])
        fleet.speed.slot.clear()

    def reload_only() -> None:
        stock.pipe.load_lora_weights(str(lora), adapter_name="job")
        stock.pipe.unload_lora_weights()

    hotswap_job()  # the first fills the worker's LoRA cache
    plain_s = _median_s(lambda: stock.run(plain, {}, lambda step, total: None), repeats)
    hotswap_s, reload_s = _median_s(hotswap_job, repeats), _median_s(reload_job, repeats)
    swap_s, load_s = _median_s(hotswap_only, repeats * 4), _median_s(reload_only, repeats * 4)
    print("lora: small Z-Image 64x64, 2 steps, a rank-4 LoRA a job, CPU eager; not a GPU figure")
    print(
        f"  LoRA work a job: hotswap {swap_s * 1000:.1f} ms, load-and-unload {load_s * 1000:.1f} ms, ratio {swap_s / load_s:.2f}"
    )
    print(
        f"  whole jobs: plain {plain_s * 1000:.1f} ms, hotswap {hotswap_s * 1000:.1f} ms, load-and-unload {reload_s * 1000:.1f} ms"
    )


def outputs_section(repeats: int, work: Path) -> None:
    import outputs  # bench/outputs.py, beside this file

    from testkit.small_models import build

    build(ROOT / "var" / "small-models", list(outputs.MODELS))
    outputs.outputs_section(ROOT / "var" / "small-models", repeats)


def encode_section(repeats: int, work: Path) -> None:
    import outputs

    outputs.encode_section(repeats)


# Independent sections, run in this order.
SECTIONS: dict[str, Callable[[int, Path], None]] = {
    "compile": compile_section,
    "lora": lora_section,
    "outputs": outputs_section,
    "encode": encode_section,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import diffusers

    from testkit.small_models import build

    diffusers.utils.logging.disable_progress_bar()
    build(ROOT / "var" / "small-models", [MODEL])
    for name, section in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as work:
            section(args.repeats, Path(work))


if __name__ == "__main__":
    main()

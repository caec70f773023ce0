"""Stock diffusers eager against the fleet's speed profile, on one GPU, same card, same run.

    python bench/gpu_speed.py [--only z-image-turbo qwen-image wan2.2-ti2v-5b] [--out DIR]
    python bench/gpu_speed.py --cpu     # checks the script end to end on tiny configs (no GPU figure)

Needs, beyond torch, transformers and accelerate: diffusers>=0.42.1, peft (the LoRA slot), this
repository on PYTHONPATH with its own requirements (pydantic, pydantic-settings), and for the
fused attention backends flash-attn (``flash``) or FlashAttention-3 (``flash_attn_interface``,
``_flash_3``); without them the profile falls back to cuDNN or native SDPA and says which ran.

Models are full size with random weights, built on the GPU from the real configurations (nothing
is downloaded); text encoders are not built (prompt embeddings are random tensors of the real
shape), so their weights are added to the measured peak from the model cards' parameter counts
when it is held against the footprint routing.memory predicts (bench/gpu_memory.py measures
memory properly, phase by phase). Random weights say nothing of quality.

Rows, each stock eager first, then the same pipeline given the fleet's profile for the model's
class (``worker.speed.prepare``: LoRA slot, attention backend, regional compile), each timed after
one warm call at the same size:

- Z-Image-Turbo, 1024x1024, 9 steps, VAE decode included;
- Qwen-Image, 1024x1024: one denoising step (two transformer passes: true CFG) and 50 steps;
- Wan2.2-TI2V-5B, 1280x704, 121 frames: one denoising step (two passes: CFG), transformer only.

Then the peak GPU memory of each model at its class's largest size against the catalog's
footprint; every mismatch (measured over the footprint, or under 60% of it) is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routing.catalog import CATALOG, footprint_gb  # noqa: E402
from routing.classes import VramClass  # noqa: E402
from routing.settings import Settings  # noqa: E402
from worker.adapters.base import Runtime  # noqa: E402
from worker.speed import prepare  # noqa: E402

# Text encoder parameters from the model cards (not built here): Qwen3-4B for Z-Image,
# Qwen2.5-VL-7B for Qwen-Image, UMT5-XXL's encoder for Wan.
TEXT_ENCODER_PARAMS = {"z-image-turbo": 4.0e9, "qwen-image": 8.3e9, "wan2.2-ti2v-5b": 5.7e9}
# The class whose profile each row runs, and its largest size (width, height, frames).
CLASS = {"z-image-turbo": VramClass.GPU16, "qwen-image": VramClass.GPU80, "wan2.2-ti2v-5b": VramClass.GPU80}
LARGEST = {
    "z-image-turbo": (2048, 2048, 0),
    "qwen-image": (2048, 2048, 0),
    "wan2.2-ti2v-5b": (1280, 704, 241),
}

# Qwen-Image's scheduler configuration (its repository's scheduler/scheduler_config.json).
QWEN_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

results: dict[str, Any] = {}


def record(name: str, value: Any) -> None:
    results[name] = value
    print(f"{name}: {value}", flush=True)


class Bench:
    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.device = "cpu" if cpu else "cuda"
        self.dtype = torch.float32 if cpu else torch.bfloat16

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize()

    def seconds(self, function: Callable[[], object], repeats: int = 3) -> float:
        function()  # warm: the first call at a size compiles under the profile
        self.sync()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            self.sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def free(self) -> None:
        gc.collect()
        if not self.cpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if not self.cpu else 0.0

    def build(self, cls: Any, model_key: str, component: str, **full: Any) -> Any:
        """Random weights on the device: the small model's config with --cpu, else ``full``."""
        if self.cpu:
            config = cls.load_config(str(ROOT / "var" / "small-models" / model_key / component))
            module = cls.from_config(config)
        else:
            torch.set_default_dtype(self.dtype)
            with torch.device(self.device):
                module = cls(**full)
            torch.set_default_dtype(torch.float32)
        return module.to(self.device, self.dtype).eval().requires_grad_(False)

    def sizes(self, width: int, height: int, frames: int = 0) -> tuple[int, int, int]:
        return (64, 64, 9 if frames else 0) if self.cpu else (width, height, frames)

    def fleet_profile(self, model_key: str, pipe: Any) -> Any:
        """Give ``pipe`` the profile the fleet's adapter gets on the model's class at load."""
        compile_profile = os.environ.get("FLEET_COMPILE_PROFILE", "eager" if self.cpu else "auto")
        settings = Settings(compile_profile=compile_profile, warm_sizes={model_key: []}, lora_max_rank=64)
        holder = SimpleNamespace(pipe=pipe, runtime=Runtime(self.device, self.dtype))
        speed = prepare(holder, CATALOG[model_key], CLASS[model_key], settings)
        record(f"{model_key} profile", {"compiled": speed.compiled, "attention": speed.attention})
        return speed


def z_image(bench: Bench) -> None:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )

    key = "z-image-turbo"
    transformer = bench.build(ZImageTransformer2DModel, key, "transformer")
    vae = bench.build(
        AutoencoderKL,
        key,
        "vae",
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = ZImagePipeline(FlowMatchEulerDiscreteScheduler(shift=3.0), vae, None, None, transformer)
    pipe.set_progress_bar_config(disable=True)
    embeds = [torch.randn(120, transformer.config.cap_feat_dim, device=bench.device, dtype=bench.dtype)]

    def job(width: int, height: int, steps: int = 9) -> Callable[[], object]:
        return lambda: pipe(
            prompt_embeds=embeds, width=width, height=height, num_inference_steps=steps, guidance_scale=0.0
        )

    width, height, _ = bench.sizes(1024, 1024)
    bench.free()
    stock = bench.seconds(job(width, height))
    bench.fleet_profile(key, pipe)
    fleet = bench.seconds(job(width, height))
    record(
        f"{key} {width}x{height} 9 steps s (stock eager, fleet profile, ratio)",
        (round(stock, 3), round(fleet, 3), round(fleet / stock, 3)),
    )
    largest = bench.sizes(*LARGEST[key])
    bench.free()
    job(largest[0], largest[1], 2)()
    memory(bench, key, largest, bench.peak_gib())


def qwen_image(bench: Bench) -> None:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    key = "qwen-image"
    transformer = bench.build(QwenImageTransformer2DModel, key, "transformer")
    vae = bench.build(AutoencoderKLQwenImage, key, "vae")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_SCHEDULER)
    pipe = QwenImagePipeline(scheduler, vae, None, None, transformer)
    pipe.set_progress_bar_config(disable=True)
    dim = transformer.config.joint_attention_dim
    embeds = torch.randn(1, 200, dim, device=bench.device, dtype=bench.dtype)
    mask = torch.ones(1, 200, device=bench.device, dtype=torch.long)

    def job(width: int, height: int, steps: int) -> Callable[[], object]:
        return lambda: pipe(
            prompt_embeds=embeds,
            prompt_embeds_mask=mask,
            negative_prompt_embeds=embeds,
            negative_prompt_embeds_mask=mask,
            true_cfg_scale=4.0,
            width=width,
            height=height,
            num_inference_steps=steps,
        )

    width, height, _ = bench.sizes(1024, 1024)
    steps = 4 if bench.cpu else 50
    bench.free()
    stock_1, stock_n = (
        bench.seconds(job(width, height, 2)),
        bench.seconds(job(width, height, steps), repeats=1),
    )
    bench.fleet_profile(key, pipe)
    fleet_1, fleet_n = (
        bench.seconds(job(width, height, 2)),
        bench.seconds(job(width, height, steps), repeats=1),
    )
    # A step: the difference between the long job and the 2-step job, per step (decode cancels).
    stock_step, fleet_step = (stock_n - stock_1) / (steps - 2), (fleet_n - fleet_1) / (steps - 2)
    record(
        f"{key} {width}x{height} one step s (stock eager, fleet profile, ratio)",
        (round(stock_step, 3), round(fleet_step, 3), round(fleet_step / stock_step, 3)),
    )
    record(
        f"{key} {width}x{height} {steps} steps s (stock eager, fleet profile, ratio)",
        (round(stock_n, 2), round(fleet_n, 2), round(fleet_n / stock_n, 3)),
    )
    largest = bench.sizes(*LARGEST[key])
    bench.free()
    job(largest[0], largest[1], 2)()
    memory(bench, key, largest, bench.peak_gib())


def wan_ti2v(bench: Bench) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    key = "wan2.2-ti2v-5b"
    transformer = bench.build(
        WanTransformer3DModel,
        key,
        "transformer",
        patch_size=(1, 2, 2),
        num_attention_heads=24,
        attention_head_dim=128,
        in_channels=48,
        out_channels=48,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=14336,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    pipe = WanPipeline(
        None, None, None, FlowMatchEulerDiscreteScheduler(shift=5.0), transformer, expand_timesteps=True
    )
    config = transformer.config
    text = torch.randn(1, 512, config.text_dim, device=bench.device, dtype=bench.dtype)
    timestep = torch.tensor([500.0], device=bench.device)

    def step(width: int, height: int, frames: int) -> Callable[[], object]:
        # The Wan2.2 VAE compresses 4x in time and 16x in space.
        latents = torch.randn(
            1,
            config.in_channels,
            (frames - 1) // 4 + 1,
            height // 16,
            width // 16,
            device=bench.device,
            dtype=bench.dtype,
        )

        def run() -> None:
            with torch.no_grad():
                for _ in range(2):  # CFG: a conditional and an unconditional pass
                    transformer(latents, timestep, text, return_dict=False)

        return run

    width, height, frames = bench.sizes(1280, 704, 121)
    bench.free()
    stock = bench.seconds(step(width, height, frames), repeats=2)
    bench.fleet_profile(key, pipe)
    fleet = bench.seconds(step(width, height, frames), repeats=2)
    record(
        f"{key} {width}x{height}x{frames} one step s (stock eager, fleet profile, ratio)",
        (round(stock, 3), round(fleet, 3), round(fleet / stock, 3)),
    )
    largest = bench.sizes(*LARGEST[key])
    bench.free()
    step(*largest)()
    memory(bench, key, largest, bench.peak_gib())


def memory(bench: Bench, model_key: str, size: tuple[int, int, int], peak_gib: float) -> None:
    spec, vram_class = CATALOG[model_key], CLASS[model_key]
    footprint = footprint_gb(spec, vram_class) or 0.0  # routing.memory's prediction
    text_gib = TEXT_ENCODER_PARAMS[model_key] * 2 / 2**30
    total = peak_gib + text_gib
    record(
        f"{model_key} peak GiB at {size} (measured, + text encoder weights)",
        (round(peak_gib, 1), round(total, 1)),
    )
    if bench.cpu:
        return
    if total > footprint or total < 0.6 * footprint:
        print(
            f"MISMATCH {model_key} on {vram_class.value}: {total:.1f} GiB at {size} against the predicted {footprint} GiB",
            flush=True,
        )


ROWS = {"z-image-turbo": z_image, "qwen-image": qwen_image, "wan2.2-ti2v-5b": wan_ti2v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny configs on the CPU: checks the script")
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS))
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    )
    args = parser.parse_args()
    bench = Bench(args.cpu)
    import diffusers

    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    record("versions", {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": device})
    for key, row in ROWS.items():
        if not args.only or key in args.only:
            row(bench)
            bench.free()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_speed.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

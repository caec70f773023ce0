# Device check (one GPU, ~5 min): the device image has torch, transformers,
# einops, numpy, pillow; carry the rest as wheels built here, then run:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl wan22==2.2.11 easydict==1.14 diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4 av==18.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 timeout 540 python3 bench/gpu_s2v.py
"""Wan2.2-S2V on a GPU: the resident group on the small checkpoint, then one full-size DiT step.

1. The small random-weight S2V checkpoint (``testkit.small_models.s2v``, official layout) through
   the real group under torchrun with world size 1 (``worker.group.supervisor.Group`` ->
   ``torchrun -m worker.group`` -> ``wan.WanS2V``, SDPA attention): start time, a cold and a warm
   job (the output MP4 must carry the speech), and a job canceled at step 2.
2. ``WanModel_S2V`` at the s2v-14B config's sizes (5120 wide, 40 layers, random bf16 weights made
   on the GPU), one denoising-step forward at 1024*704 (one 80-frame clip: 20 latent frames + the
   reference and frame-packed motion tokens), with SDPA's flash kernel, its first and second call,
   against the same forward on SDPA's memory-efficient kernel (the baseline, same run). Seconds
   and ``torch.cuda.max_memory_allocated`` for each.

Needs CUDA and fails at once without it. ``--cpu`` checks this script before a GPU is spent on it:
part 1 on the CPU (float32, the checkpoint at its 128*64 cap), and part 2's forward with the small
checkpoint's widths at 128*64, SDPA's flash kernel against its math one (the CPU has no
memory-efficient kernel). Its figures say nothing about a GPU. Not part of the test suite.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _require_cuda() -> None:
    try:
        import torch
    except ImportError:
        sys.exit("bench/gpu_s2v.py: torch is not installed")
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_s2v.py needs a CUDA GPU and found none (torch.cuda.is_available() is False)")


def _speech(seconds: float, rate: int = 16000) -> bytes:
    import numpy as np

    from worker.media import encode_wav

    t = np.arange(int(seconds * rate)) / rate
    return encode_wav(np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t) * 0.37, rate)


def small_checkpoint_through_the_group(workdir: Path, device: str = "cuda") -> None:
    import av
    import numpy as np
    from PIL import Image

    from routing.schemas import SpeechToVideoRequest
    from testkit.s2v import GROUP_MODEL
    from testkit.small_models.s2v import build_wan22_s2v_14b
    from worker.adapters.base import Inputs, JobCanceled
    from worker.group.supervisor import Group
    from worker.media import encode_png

    print(f"== 1. small S2V checkpoint through the group (torchrun, world size 1, {device}) ==", flush=True)
    checkpoint = workdir / "wan2.2-s2v-14b"
    t0 = time.perf_counter()
    # On the GPU at the size asked for (no small-model cap on the rendered area).
    build_wan22_s2v_14b(checkpoint, max_area=None if device == "cuda" else 128 * 64)
    print(f"built the small checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
    # The ranks read their settings from the environment: the small checkpoint's group model.
    os.environ["FLEET_GROUP_ADAPTERS"] = json.dumps({"wan2.2-s2v-14b": GROUP_MODEL})

    group = Group(
        models={"wan2.2-s2v-14b": str(checkpoint)},
        world_size=1,
        device=device,
        dtype="bfloat16" if device == "cuda" else "float32",
        timeout_s=300,
        start_timeout_s=300,
        job_timeout_s=300,
        log_dir=workdir / "group-logs",
    )
    try:
        t0 = time.perf_counter()
        group.ensure_running()
        print(f"group start (torchrun + load): {time.perf_counter() - t0:.1f} s", flush=True)

        speech = _speech(3.0)
        face = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 500, 3), dtype=np.uint8))
        request = SpeechToVideoRequest.model_validate(
            {
                "model": "wan2.2-s2v-14b",
                "prompt": "a person talks to the camera",
                "image": {"key": "uploads/face.png"},
                "audio": {"key": "uploads/speech.wav"},
                "width": 832,
                "height": 480,
                "steps": 4,
                "guidance_scale": 4.5,
                "seed": 7,
                "clips": 1,
            }
        )
        inputs = Inputs.decode({"image": encode_png(face), "audio": speech})
        times = []
        for label in ("cold", "warm"):
            steps: list[tuple[int, int]] = []
            t0 = time.perf_counter()
            out = group.run("wan2.2-s2v-14b", request, inputs, lambda s, n, seen=steps: seen.append((s, n)))
            times.append(time.perf_counter() - t0)
            with av.open(io.BytesIO(out.data)) as c:
                audio = c.streams.audio[0]
                seconds = sum(f.samples for f in c.decode(audio)) / audio.codec_context.sample_rate
            print(
                f"job ({label}): {times[-1]:.2f} s, steps {steps}, {out.width}x{out.height}, "
                f"{out.frame_count} frames at {out.fps} fps, audio {seconds:.2f} s (speech 3.00 s)",
                flush=True,
            )
            assert abs(seconds - 3.0) < 0.15, "the MP4's audio does not match the speech"
        print(f"ratio warm/cold job: {times[1] / times[0]:.3f}", flush=True)

        def cancel_at_2(step: int, total: int) -> None:
            if step == 2:
                raise JobCanceled()

        t0 = time.perf_counter()
        try:
            group.run("wan2.2-s2v-14b", request, inputs, cancel_at_2)
            print("cancel: NOT canceled (unexpected)", flush=True)
        except JobCanceled:
            print(
                f"cancel at step 2: stopped in {time.perf_counter() - t0:.2f} s; group alive: {group.alive}"
            )
        log_text = "".join(p.read_text() for p in sorted((workdir / "group-logs").glob("*.log")))
        peaks = [
            line.split("peak GPU memory ")[1].rstrip(")\n")
            for line in log_text.splitlines()
            if "peak GPU memory" in line
        ]
        print(f"rank 0 peak GPU memory per job: {peaks}", flush=True)
    finally:
        group.close()


def full_size_dit_step(on_cpu: bool = False) -> None:
    import contextlib

    import torch
    from accelerate import init_on_device
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from testkit.small_models import s2v as small
    from worker.adapters.wan_s2v.official import import_wan_modules

    modules = import_wan_modules()
    config = modules["configs"].WAN_CONFIGS["s2v-14B"]
    settings = {k: v for k, v in dict(config.transformer).items() if k != "__name__"}
    if on_cpu:
        print(
            "== 2. (--cpu) WanModel_S2V at the small checkpoint's widths, one step at 128*64 ==", flush=True
        )
        settings.update(small.DIT, audio_dim=small.AUDIO_DIM)
        device, dtype, (width, height) = torch.device("cpu"), torch.float32, (128, 64)
        baseline_backend = SDPBackend.MATH
    else:
        print(
            "== 2. full-size WanModel_S2V (s2v-14B config, random bf16), one step at 1024*704 ==", flush=True
        )
        device, dtype, (width, height) = torch.device("cuda"), torch.bfloat16, (1024, 704)
        baseline_backend = SDPBackend.EFFICIENT_ATTENTION
        torch.cuda.reset_peak_memory_stats()

    def synchronize() -> None:
        if not on_cpu:
            torch.cuda.synchronize()

    def peak_gib() -> float:
        return float("nan") if on_cpu else torch.cuda.max_memory_allocated() / 2**30

    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    # Parameters made in bf16 straight on the GPU (64 GB of fp32 would not fit an H100), the
    # model's other tensors (RoPE tables, frame-pack buckets) on the CPU: where
    # from_pretrained(device_map="cuda") leaves them in the official code.
    torch.set_default_dtype(dtype)
    try:
        with init_on_device(device, include_buffers=False):
            torch.manual_seed(0)
            dit = modules["model_s2v"].WanModel_S2V(**settings).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in dit.parameters())
    weights_gib = float("nan") if on_cpu else torch.cuda.memory_allocated() / 2**30
    print(
        f"built {params / 1e9:.2f}B parameters in {time.perf_counter() - t0:.1f} s ({weights_gib:.1f} GiB)",
        flush=True,
    )

    frames = 80
    motion = config.transformer.motion_frames
    lat_motion = (motion + 3) // 4
    lat_frames = (frames + 3 + motion) // 4 - lat_motion
    latent = (height // 8, width // 8)
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = dtype
    noise = torch.randn(16, lat_frames, *latent, device=device, dtype=bf16, generator=g)
    kwargs = dict(
        t=torch.tensor([999.0], device=device),
        context=[torch.randn(120, 4096, device=device, dtype=bf16, generator=g)],
        seq_len=lat_frames * latent[0] * latent[1] // 4,
        cond_states=torch.randn(1, 16, lat_frames, *latent, device=device, dtype=bf16, generator=g),
        motion_latents=torch.randn(1, 16, lat_motion, *latent, device=device, dtype=bf16, generator=g),
        ref_latents=torch.randn(1, 16, 1, *latent, device=device, dtype=bf16, generator=g),
        audio_input=torch.randn(1, 25, settings["audio_dim"], frames, device=device, dtype=bf16, generator=g),
        motion_frames=[motion, lat_motion],
        drop_motion_frames=False,
    )
    print(f"latent {lat_frames}x{latent[0]}x{latent[1]}: {kwargs['seq_len']} video tokens", flush=True)

    def forward(backend: SDPBackend) -> tuple[float, float]:
        synchronize()
        if not on_cpu:
            torch.cuda.reset_peak_memory_stats()
        autocast = contextlib.nullcontext() if on_cpu else torch.amp.autocast("cuda", dtype=bf16)
        start = time.perf_counter()
        with torch.no_grad(), autocast, sdpa_kernel(backend):
            out = dit([noise], **kwargs)[0]
        synchronize()
        seconds = time.perf_counter() - start
        assert out.shape == noise.shape and torch.isfinite(out).all()
        return seconds, peak_gib()

    baseline_name = baseline_backend.name.lower()
    first, first_peak = forward(SDPBackend.FLASH_ATTENTION)
    second, second_peak = forward(SDPBackend.FLASH_ATTENTION)
    baseline, baseline_peak = forward(baseline_backend)
    print(f"step forward, SDPA flash, first:  {first:.2f} s, peak {first_peak:.1f} GiB", flush=True)
    print(f"step forward, SDPA flash, second: {second:.2f} s, peak {second_peak:.1f} GiB", flush=True)
    print(f"step forward, SDPA {baseline_name} (baseline): {baseline:.2f} s, peak {baseline_peak:.1f} GiB")
    print(f"ratio flash/{baseline_name}: {second / baseline:.3f}; second/first: {second / first:.3f}")
    if not on_cpu:
        print(
            f"one 40-step clip with CFG (2 forwards a step) on one GPU would take ~{80 * second / 60:.1f} min "
            "of DiT time; the group splits it over 8 ranks (Ulysses) plus communication",
            flush=True,
        )


def main() -> int:
    if sys.argv[1:] == ["--cpu"]:
        with tempfile.TemporaryDirectory(prefix="gpu-s2v-") as tmp:
            small_checkpoint_through_the_group(Path(tmp), device="cpu")
        full_size_dit_step(on_cpu=True)
        return 0
    _require_cuda()
    import torch

    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-s2v-") as tmp:
        small_checkpoint_through_the_group(Path(tmp))
    full_size_dit_step()
    return 0


if __name__ == "__main__":
    sys.exit(main())

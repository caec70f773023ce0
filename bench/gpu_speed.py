"""Stock diffusers against the fleet, on one GPU, every case of the speed goals, same card, same run.

    python bench/gpu_speed.py [--only CASE ...] [--rows ROW ...] [--runs 5] [--out DIR]
    python bench/gpu_speed.py --cpu [--out DIR]      # every case end to end on tiny configurations
    python bench/gpu_speed.py --plan                 # the GPU runs below, each sized to ~8 minutes
    python bench/gpu_speed.py --merge FILE           # a GPU run's file into bench/results/gpu-speed.json
    python bench/gpu_speed.py --table                # the README's GPU table, from that file

Cases (the keys of ``bench/results/gpu-speed.json``), each end to end through the fleet's own
adapters (text encoders built at their real configurations, the step callback, VAE decode)
unless it says otherwise: ``z-image-turbo/1024/e2e``; ``qwen-image/1024/50`` (true CFG);
``qwen-image/1024/50/cache`` (the fleet's TaylorSeer step cache: its skips follow a fixed
schedule, so random weights cost what real ones do); ``qwen-image/1024/lightning-8`` (the variant
through the fleet's LoRA slot, against stock diffusers with the same LoRA loaded);
``qwen-image-edit-2509/1024/40`` (two input images); ``wan2.2-ti2v-5b/1280x704x121/step`` (one
denoising step with CFG, the pipeline's own per-token timesteps, latents out, text encoded
before); ``wan2.2-ti2v-5b/1280x704x121/fast-e2e`` (the ``fastwan-3`` variant: FastWan2.2-TI2V-5B's
3 DMD steps without CFG, its checkpoint swapped into the fleet's transformer, against stock
diffusers with it loaded as the model, by the same sampler); ``wan2.2-s2v-14b/1024x704/step`` (one
forward of the official S2V DiT).

Models are full size with random weights made on the card from ``routing/memory/configs.json``
(nothing is downloaded; tokenizers, schedulers and processors come from the small models, built
here). Random weights say nothing of quality: the deviation says how far each row's output is
from stock's, for the same weights, seed and prompt.

Rows, in one process on one card, every row an adapter of its own over the same weights (its
transformer a copy sharing them), timed in A/B/B/A order (each round the reverse of the last),
``--runs`` rounds (at least 5 on a GPU), prompts of three lengths in turn; median and spread
((max - min) / median) per row:

- ``stock``: stock diffusers, eager, PyTorch's SDPA (``native``); every run has it;
- ``stock-compile``: stock plus diffusers' own one line of regional compile
  (``compile_repeated_blocks(fullgraph=True)``), warmed as a worker is;
- ``attention``: that, with each attention backend the card has, one row each
  (``attention:_native_cudnn``...);
- ``lora-slot-on``: regional compile, native attention and the fleet's LoRA slot, with base jobs
  running through the zero slot (the fleet's design before the slot was switched off for them);
- ``fleet``: the fleet's profile (``worker.speed.prepare``: LoRA slot switched off for base jobs,
  the first attention backend the card has, regional compile, warm-up at the catalog's sizes);
- ``fleet+fp8``, ``fleet+cuda-graphs``: the profile with FP8 linear layers (torchao) or CUDA
  graphs (``FLEET_FP8=on``, ``FLEET_CUDA_GRAPHS=on``); skipped, with the reason, where the card
  or the install lacks them;
- ``fleet+te-compile``: the profile with the text encoder's layers compiled too
  (``FLEET_COMPILE_TEXT_ENCODER=on``), on the end-to-end cases whose text encoding is a share
  worth trying (Z-Image, Qwen-Image Lightning, FastWan);
- ``fleet+fused-qkv``: the profile with fused QKV projections (``FLEET_FUSED_QKV=on``: one GEMM
  for query, key and value, worker/fused.py; Qwen-Image's and Z-Image's through the fleet's
  processors, worker/fused_attention.py), on the cases whose jobs run no LoRA (a LoRA variant's
  run the three layers through the slot) and no step cache;
- the cache case: ``stock`` (uncached), ``stock+cache`` and ``fleet`` (the request's cache);
- S2V: ``stock`` (the official code as the fleet's group runs it, SDPA), ``tf32``, ``cudnn``
  (SDPA's cuDNN kernel), ``compile`` (its blocks compiled), ``compile+tf32+cudnn``.

Every compiled row is warmed as a worker is (``worker.speed``'s warm-up: the catalog's sizes for
the class, prompts of two lengths); the case's own size and prompts then run as a worker's jobs
would: the graphs its first call compiles are reported (``first_call_graphs``), and the graphs
compiled during the timed runs must be none (``recompiles``; the run exits 1 otherwise). Peak
reserved memory (``torch.cuda.max_memory_reserved``) is read on the second of two calls at the
case's size (stock and fleet) and at each warm size (fleet). Deviation: PSNR of the decoded
output, or the cosine similarity of the latents (the step cases), against stock's; the floor is
stock's own on another SDPA kernel (memory-efficient against flash), and a row is lossless when
it is no further from stock than that.

Results: each case's ``stock_s``, ``stock_compiled_s``, ``fleet_s``, ``spread``, ``lossless``,
``deviation``, its device, versions and date, its rows, its anchor and goal, merged into
``bench/results/gpu-speed.json``: a case or row measured before keeps its figures unless re-run
(on another card, the case is replaced whole). With ``--out DIR`` (default ``$OUT``) the merged
file is also written to ``DIR/gpu-speed.json``. ``--cpu`` runs every case on the small models
(float32, dynamo tracing with its eager backend, no inductor: the recompile checks run, the
figures mean nothing), 2 runs, and writes only ``DIR/gpu-speed.json`` (default
``var/gpu-speed-cpu``), device "cpu": never the committed file.

On the lent GPU machine (its image has torch, transformers, accelerate, peft, tokenizers; not
diffusers, pydantic or torchao): carry the rest as wheels. Here, once, in the repository's root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\
      -d .whl diffusers==0.42.1 pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 \\
      python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 ftfy==6.3.1 \\
      wcwidth==0.9.4 torchao==0.18.0 wan22==2.2.11 easydict==1.14

Then each run, with ``carry: [".whl"]`` and a timeout_s of 600, is one of the lines ``--plan``
prints, after:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 || exit; \\
      timeout 570 python3 bench/gpu_speed.py --deadline-s 540 ...

(the script builds the small models it takes tokenizers and schedulers from, in seconds).
``--deadline-s`` ends the run on its own before the timeout, with what it measured: past it no
case or row starts (a row not made says so), and no timed round that would end after it, by the
last round's length (a row then has fewer runs than ``--runs``: its ``runs_s`` and the case's
``runs`` say how many, and the table shows it); the peak memory calls are left out past it.

Each run's ``$OUT/gpu-speed.json`` comes back (written after every case, so a run cut short
keeps the cases it finished); merge it here (``--merge``) before the next run, so the next one
starts from it, and commit the file. The runs, as ``--plan`` prints them (estimates from the
earlier H200 figures and the anchors: a first run of a case measures its build and compile;
Qwen-Image-Edit-2509's two-row runs are estimated past 8 minutes, so give them all of a run's
10); the Qwen models' ``fleet+fp8`` rows need an H200 (``kind: nvidia-h200``: the FP8 weights
sit beside the bf16 ones the other rows run). The first run of a case makes the deviation floor
(``stock-kernel``); every run makes ``stock``. The first 13 runs give every case its figures
(``stock_s``, ``stock_compiled_s``, ``fleet_s``, the deviation), the rest the ablation:

    --only z-image-turbo/1024/e2e --rows stock stock-kernel fleet stock-compile attention lora-slot-on fleet+fp8 fleet+cuda-graphs   # ~437 s
    --only qwen-image/1024/50 --rows stock stock-kernel fleet   # ~339 s
    --only qwen-image/1024/50 --rows stock stock-compile   # ~320 s
    --only qwen-image/1024/50/cache   # ~431 s
    --only qwen-image/1024/lightning-8 --rows stock stock-kernel fleet stock-compile fleet+fp8   # ~402 s
    --only qwen-image-edit-2509/1024/40 --rows stock stock-kernel   # ~288 s
    --only qwen-image-edit-2509/1024/40 --rows stock fleet   # ~550 s
    --only qwen-image-edit-2509/1024/40 --rows stock stock-compile   # ~550 s
    --only wan2.2-ti2v-5b/1280x704x121/step --rows stock stock-kernel fleet stock-compile attention   # ~448 s
    --only wan2.2-ti2v-5b/1280x704x121/fast-e2e --rows stock stock-kernel   # ~260 s
    --only wan2.2-ti2v-5b/1280x704x121/fast-e2e --rows stock fleet   # ~473 s
    --only wan2.2-ti2v-5b/1280x704x121/fast-e2e --rows stock stock-compile   # ~473 s
    --only wan2.2-s2v-14b/1024x704/step --rows stock stock-kernel tf32 cudnn   # ~413 s
    --only z-image-turbo/1024/e2e wan2.2-ti2v-5b/1280x704x121/step --rows stock fleet+te-compile fleet+fused-qkv   # ~347 s
    --only qwen-image/1024/50 --rows stock attention   # ~320 s
    --only qwen-image/1024/50 --rows stock lora-slot-on   # ~320 s
    --only qwen-image/1024/50 --rows stock fleet+fp8   # ~320 s
    --only qwen-image/1024/50 --rows stock fleet+cuda-graphs   # ~320 s
    --only qwen-image/1024/50 --rows stock fleet+fused-qkv   # ~320 s
    --only qwen-image/1024/lightning-8 --rows stock fleet+cuda-graphs fleet+te-compile   # ~283 s
    --only qwen-image-edit-2509/1024/40 --rows stock attention   # ~550 s
    --only qwen-image-edit-2509/1024/40 --rows stock lora-slot-on   # ~550 s
    --only qwen-image-edit-2509/1024/40 --rows stock fleet+fp8   # ~550 s
    --only qwen-image-edit-2509/1024/40 --rows stock fleet+cuda-graphs   # ~550 s
    --only qwen-image-edit-2509/1024/40 --rows stock fleet+fused-qkv   # ~550 s
    --only wan2.2-ti2v-5b/1280x704x121/step --rows stock lora-slot-on fleet+fp8 fleet+cuda-graphs   # ~446 s
    --only wan2.2-ti2v-5b/1280x704x121/fast-e2e --rows stock fleet+te-compile   # ~473 s
    --only wan2.2-ti2v-5b/1280x704x121/fast-e2e --rows stock fleet+fused-qkv   # ~473 s
    --only wan2.2-s2v-14b/1024x704/step --rows stock compile   # ~374 s
    --only wan2.2-s2v-14b/1024x704/step --rows stock compile+tf32+cudnn   # ~374 s
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RESULTS = ROOT / "bench" / "results" / "gpu-speed.json"
CPU_OUT = ROOT / "var" / "gpu-speed-cpu"
# The fleet's row is made first of the compiled ones: its warm-up then compiles what a worker's
# does, and its first call at the case's size shows what a worker's first job there compiles.
DIFFUSERS_ROWS = (
    "stock",
    "stock-kernel",
    "fleet",
    "stock-compile",
    "attention",
    "lora-slot-on",
    "fleet+fp8",
    "fleet+cuda-graphs",
)
S2V_ROWS = ("stock", "stock-kernel", "tf32", "cudnn", "compile", "compile+tf32+cudnn")
# The rows that make a case's figures in the results file, beside stock (S2V's fleet is stock).
CORE_ROWS = {"stock-kernel", "fleet", "stock-compile"}
# Rows that compile nothing (for the plan's estimates), and the untimed floor row.
EAGER_ROWS = ("stock", "stock-kernel", "stock+cache", "tf32", "cudnn")
# Attention backends tried for the ``attention`` rows (diffusers' names), those the install has;
# the first of the catalog's list the card has is the fleet's. ``native`` (SDPA's own choice:
# its flash kernel in bf16) is stock-compile's; ``_native_efficient`` is the deviation floor's.
# On the GPU machine's image, with the wheels above, that leaves cuDNN.
ATTENTION = ("_native_cudnn", "flash", "_flash_3", "sage")
CPU_ATTENTION = ("_native_math",)


@dataclass(frozen=True)
class Case:
    key: str
    model: str
    size: tuple[int, int, int]  # width, height, frames (0: an image)
    steps: int
    # "e2e": the adapter's job; "step": one denoising step of the pipeline, latents out;
    # "dit": one forward of the official S2V DiT.
    scope: str
    anchor: str
    goal_s: float
    # A stock run's seconds on one H200 (earlier runs, the anchors): for the plan's estimates.
    run_s: float
    # None: the catalog's default guidance, as a job that names none gets.
    guidance: float | None = None
    input_images: int = 0
    variant: str | None = None
    cache: tuple[tuple[str, Any], ...] | None = None
    rows: tuple[str, ...] = DIFFUSERS_ROWS
    lossless_goal: bool = True
    cpu_steps: int = 1
    note: str = ""


CASES = [
    Case(
        "z-image-turbo/1024/e2e",
        "z-image-turbo",
        (1024, 1024, 0),
        9,
        "e2e",
        "SGLang 0.906 s on 1 H100 (0.753 s on 2), end to end",
        0.75,
        1.45,
        rows=(*DIFFUSERS_ROWS, "fleet+te-compile", "fleet+fused-qkv"),
    ),
    Case(
        "qwen-image/1024/50",
        "qwen-image",
        (1024, 1024, 0),
        50,
        "e2e",
        "SGLang 12.77 s (H100); stock diffusers 18.2-18.5 s",
        11.5,
        18.3,
        rows=(*DIFFUSERS_ROWS, "fleet+fused-qkv"),
    ),
    Case(
        "qwen-image/1024/50/cache",
        "qwen-image",
        (1024, 1024, 0),
        50,
        "e2e",
        "SGLang + Cache-DiT 4.53 s (H100)",
        4.0,
        18.3,
        cache=(("method", "taylorseer"),),
        rows=("stock", "stock-kernel", "stock+cache", "fleet"),
        lossless_goal=False,
        cpu_steps=5,  # TaylorSeer's 3 full steps, then predicted ones
        note="stock_s is uncached stock; stock diffusers cannot compile its blocks with a cache",
    ),
    Case(
        "qwen-image/1024/lightning-8",
        "qwen-image",
        (1024, 1024, 0),
        8,
        "e2e",
        "none published on an H100",
        1.2,
        3.0,
        guidance=1.0,
        variant="lightning-8",
        lossless_goal=False,
        rows=(
            "stock",
            "stock-kernel",
            "fleet",
            "stock-compile",
            "fleet+fp8",
            "fleet+cuda-graphs",
            "fleet+te-compile",
        ),
        note="random rank-64 weights in the Lightning LoRA's layout; stock has it loaded (unfused)",
    ),
    Case(
        "qwen-image-edit-2509/1024/40",
        "qwen-image-edit-2509",
        (1024, 1024, 0),
        40,
        "e2e",
        "SGLang 38.6 s",
        30.0,
        40.0,
        input_images=2,
        rows=(*DIFFUSERS_ROWS, "fleet+fused-qkv"),
    ),
    Case(
        "wan2.2-ti2v-5b/1280x704x121/step",
        "wan2.2-ti2v-5b",
        (1280, 704, 121),
        1,
        "step",
        "ours 1.878 s (H200, the first run's fleet profile)",
        1.70,
        2.07,
        rows=(*DIFFUSERS_ROWS, "fleet+fused-qkv"),
    ),
    Case(
        "wan2.2-ti2v-5b/1280x704x121/fast-e2e",
        "wan2.2-ti2v-5b",
        (1280, 704, 121),
        3,
        "e2e",
        "FastVideo's 3-step FastWan2.2-TI2V-5B: 16 s end to end on one H200",
        10.0,
        20.0,
        guidance=1.0,
        variant="fastwan-3",
        # No FP8 row: a checkpoint variant does not swap into FP8 layers (worker/checkpoints.py).
        rows=("stock", "stock-kernel", "fleet", "stock-compile", "fleet+te-compile", "fleet+fused-qkv"),
        lossless_goal=False,
        note="the fastwan-3 variant (DMD steps at 1000, 757, 522) on the model's random weights saved "
        "as its checkpoint; stock runs them loaded as the model, by the same sampler",
    ),
    Case(
        "wan2.2-s2v-14b/1024x704/step",
        "wan2.2-s2v-14b",
        (1024, 704, 80),
        1,
        "dit",
        "ours 14.22 s (SDPA flash, H200)",
        10.0,
        14.2,
        rows=S2V_ROWS,
        lossless_goal=False,
        note="fleet_s is stock's: the group's profile turns on none of these rows' techniques until "
        "they are measured (FLEET_TF32 and FLEET_ATTENTION_BACKEND run them in the group)",
    ),
]
BY_KEY = {case.key: case for case in CASES}
# Seconds to build a model's components on the card, and to compile and warm one compiled row
# at the catalog's sizes (estimates for the plan, until a GPU run of the case measures them).
BUILD_S = {"z-image-turbo": 20, "qwen-image": 30, "qwen-image-edit-2509": 30, "wan2.2-ti2v-5b": 20}
COMPILE_S = {"z-image-turbo": 60, "qwen-image": 100, "qwen-image-edit-2509": 100, "wan2.2-ti2v-5b": 120}


def expand_rows(case: Case, wanted: list[str] | None, attention: tuple[str, ...]) -> list[str]:
    """The case's rows ``wanted`` picks (all by default), ``attention`` as one row a backend;
    ``stock`` always, first: every row is held against it."""
    names = [name for name in case.rows if not wanted or name in wanted or name == "stock"]
    for name in wanted or []:
        if name.startswith("attention:") and "attention" in case.rows and name not in names:
            names.append(name)
    out: list[str] = []
    for name in names:
        out += [f"attention:{b}" for b in attention] if name == "attention" else [name]
    return out


def estimate_s(case: Case, rows: list[str], runs: int) -> float:
    """Seconds a run of ``rows`` of ``case`` takes on an H200, by estimate: the build, each
    compiled row's compile and warm-up, the timed runs (the floor once), a short first call and
    the memory calls."""
    compiled = [r for r in rows if r not in EAGER_ROWS]
    timed = [r for r in rows if r != "stock-kernel"]
    short = case.run_s * min(1.0, 2 / case.steps)
    return (
        BUILD_S.get(case.model, 30)
        + len(compiled) * COMPILE_S.get(case.model, 60)
        + len(timed) * runs * case.run_s
        + case.run_s * ("stock-kernel" in rows)
        + len(timed) * short
        + 8 * short
    )


def plan(runs: int, budget_s: float) -> list[tuple[list[str], list[str], float]]:
    """Runs of at most ``budget_s`` each (by estimate): the cases of a model together while they
    fit, a case's rows split over runs where it does not fit alone, and short runs of other
    models put together (``_packed``)."""
    out: list[tuple[list[str], list[str], float]] = []
    for case in CASES:
        rows = expand_rows(case, None, ("_native_cudnn",))
        whole = estimate_s(case, rows, runs)
        if whole <= budget_s:
            last = out[-1] if out else None
            if (
                last
                and not last[1]
                and BY_KEY[last[0][-1]].model == case.model
                and last[2] + whole <= budget_s
            ):
                last[0].append(case.key)
                out[-1] = (last[0], [], last[2] + whole - BUILD_S.get(case.model, 60))
            else:
                out.append(([case.key], [], whole))
            continue
        chunk: list[str] = []
        for name in [r for r in case.rows if r != "stock"]:
            trial = ["stock", *chunk, name]
            if chunk and estimate_s(case, expand_rows(case, trial, ("_native_cudnn",)), runs) > budget_s:
                out.append(([case.key], ["stock", *chunk], estimate_s(case, ["stock", *chunk], runs)))
                chunk = []
            chunk.append(name)
        out.append(([case.key], ["stock", *chunk], estimate_s(case, ["stock", *chunk], runs)))
    # GPU time comes a run at a time: the runs that give every case its figures (stock_s,
    # stock_compiled_s, fleet_s) and its deviation floor go first, the ablation after them.
    return sorted(_packed(out, budget_s), key=lambda run: not _core(run[1]))


def _core(rows: list[str]) -> bool:
    """Whether a run's rows give a case its figures (no rows: the whole case)."""
    return not rows or bool(CORE_ROWS & set(rows))


def _packed(
    runs: list[tuple[list[str], list[str], float]], budget_s: float
) -> list[tuple[list[str], list[str], float]]:
    """``runs`` with those of other cases put together where both fit one run (the bench frees
    one model before it builds the next): first fit, core runs with core runs. ``--rows`` is
    one list for the run, so two are put together only where each case keeps its own rows."""
    out: list[tuple[list[str], list[str], float]] = []
    for keys, rows, seconds in runs:
        for index, (into_keys, into_rows, into_seconds) in enumerate(out):
            if (
                not rows
                or not into_rows
                or _core(rows) != _core(into_rows)
                or into_seconds + seconds > budget_s
                or set(keys) & set(into_keys)
            ):
                continue
            union = [*into_rows, *(row for row in rows if row not in into_rows)]
            keeps = all(
                expand_rows(BY_KEY[key], union, ATTENTION[:1]) == expand_rows(BY_KEY[key], own, ATTENTION[:1])
                for own, group in ((rows, keys), (into_rows, into_keys))
                for key in group
            )
            if keeps:
                out[index] = ([*into_keys, *keys], union, into_seconds + seconds)
                break
        else:
            out.append((keys, rows, seconds))
    return out


# -- the diffusers cases ---------------------------------------------------------------------


@contextlib.contextmanager
def cpu_compile(trace: bool) -> Iterator[None]:
    """--cpu: regional compiles asked for, but traced by nobody (dynamo takes minutes over these
    models on a small CPU); with ``--trace``, traced by dynamo with its eager backend (no code
    generation): graph breaks, guards and recompiles then behave as compiled."""
    import torch
    from diffusers import ModelMixin

    original = ModelMixin.compile_repeated_blocks
    original_layer = torch.nn.Module.compile  # the text encoder's layers (FLEET_COMPILE_TEXT_ENCODER)

    def compile_repeated_blocks(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not trace:
            return None
        kwargs.pop("mode", None)
        return original(self, *args, **(kwargs | {"backend": "eager"}))

    def compile_layer(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original_layer(self, *args, **(kwargs | {"backend": "eager"})) if trace else None

    ModelMixin.compile_repeated_blocks = compile_repeated_blocks
    torch.nn.Module.compile = compile_layer
    try:
        yield
    finally:
        ModelMixin.compile_repeated_blocks = original
        torch.nn.Module.compile = original_layer


def random_lora(transformer: Any, pattern: str, rank: int, path: Path) -> Path:
    """A LoRA of random weights for every layer the catalog's pattern names, in diffusers'
    layout: a stand-in for a distillation LoRA of that rank (its values change the output)."""
    import torch
    from safetensors.torch import save_file

    from worker.loras import target_modules

    device = next(transformer.parameters()).device  # made on the card: a full-size one is ~1 GB
    generator = torch.Generator(device=device).manual_seed(1)
    state = {}
    for name, layer in target_modules(transformer, pattern).items():
        a = torch.randn(rank, layer.in_features, generator=generator, device=device) / layer.in_features**0.5
        b = torch.randn(layer.out_features, rank, generator=generator, device=device) * 0.01
        state[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16).cpu()
        state[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16).cpu()
    save_file(state, path)
    return path


def diffusers_case(
    case: Case,
    model: Any,
    device: Any,
    wanted: list[str] | None,
    runs: int,
    work: Path,
    trace: bool,
    deadline: float | None = None,
) -> dict:
    import gpu_speed_rows as g
    import numpy as np
    import torch
    from PIL import Image

    from routing.classes import VramClass
    from routing.schemas import parse_request
    from routing.settings import Settings
    from worker.adapters.base import Inputs, step_callback_for
    from worker.speed import WARM_PROMPTS, _warm, cuda_graphs_refused, fp8_refused, job_context, prepare

    spec = model.spec
    width, height, frames = g.CPU_SIZE if device.cpu else case.size
    frames = frames if spec.video is not None else 0
    steps = min(case.steps, case.cpu_steps) if device.cpu else case.steps
    if case.cache and device.cpu:
        steps = case.cpu_steps
    storage = None  # the bench's jobs name no LoRA from a store
    warm_sizes = g.CPU_WARM if device.cpu else list(spec.speed[VramClass.GPU80].warm_sizes)
    warm_sizes = [(w, h, f if spec.video is not None else 0) for w, h, f in warm_sizes]
    if device.cpu and not trace:
        warm_sizes = []  # nothing is compiled: nothing to warm
    # The variant's weights: a random LoRA of the distillation LoRA's rank, or for a checkpoint
    # variant the model's own random transformer saved as one (it costs what the real one does).
    lora_path = variant_path = None
    checkpoint = bool(case.variant) and spec.variants[case.variant].checkpoint is not None
    # A DMD variant runs its own steps only: every call, short ones and the CPU's included.
    fixed_steps = len(spec.variants[case.variant].dmd_timesteps) if case.variant else 0
    if checkpoint:
        variant_path = work / "checkpoint"
        model.transformer.save_pretrained(str(variant_path / "transformer"))
    elif case.variant:
        rank = 64 if not device.cpu else 4
        lora_path = variant_path = random_lora(
            model.transformer, spec.lora_modules, rank, work / "variant.safetensors"
        )
    noise = np.random.default_rng(SEED_IMAGES).integers(0, 255, (height, width, 3), dtype=np.uint8)
    images = [Image.fromarray(noise), Image.fromarray(noise[::-1].copy())][: case.input_images]

    def request(index: int, size: tuple[int, int, int] | None, steps_: int | None, fleet: bool, cached: bool):
        w, h, f = size or (width, height, frames)
        data: dict[str, Any] = {"model": spec.key, "prompt": g.PROMPTS[index], "seed": g.SEED}
        data |= {
            "width": w,
            "height": h,
            "steps": fixed_steps or steps_ or steps,
            "kind": spec.task_kinds[0].value,
        }
        if case.guidance is not None:
            data["guidance_scale"] = case.guidance
        if f:
            data["frames"] = f
        if images:
            data["images"] = [{"key": f"inputs/{i}.png"} for i in range(len(images))]
        # Stock runs a checkpoint variant too: its weights are the model's, its sampler the
        # adapter's (diffusers' own scheduler); stock runs a LoRA variant's LoRA, unfused.
        if case.variant and (fleet or checkpoint):
            data["variant"] = case.variant
        if case.cache and cached:
            data["cache"] = dict(case.cache)
        return parse_request(data)

    def job(adapter: Any, row: Any, fleet: bool, cached: bool, techniques: dict[str, float] | None):
        def call(index: int, size: tuple[int, int, int] | None = None, steps_: int | None = None) -> Any:
            req = request(index, size, steps_, fleet, cached)
            timings: dict[str, float] = {}
            done: list[int] = []
            # Stock adapters have no speed profile, which job_context would need for the variant.
            plain = checkpoint and not fleet
            with (
                torch.no_grad(),
                contextlib.nullcontext() if plain else job_context(adapter, req, storage, timings),
            ):
                if case.scope == "step":
                    positive, negative = model.wan_embeddings(adapter, g.PROMPTS[index])
                    out = adapter.t2v(
                        prompt_embeds=positive,
                        negative_prompt_embeds=negative,
                        width=req.width,
                        height=req.height,
                        num_frames=req.frames,
                        num_inference_steps=steps_ or steps,
                        guidance_scale=req.guidance_scale,
                        generator=torch.Generator().manual_seed(g.SEED),
                        output_type="latent",
                        callback_on_step_end=step_callback_for(lambda step, total: done.append(step)),
                    ).frames
                else:
                    out = adapter.run(req, Inputs({"images": images}), lambda step, total: done.append(step))
            row.techniques = dict(techniques) if techniques is not None else timings
            return out

        return call

    def stock(backend: str = "native", compiled: bool = False, cached: bool = False):
        def make(row: Any) -> Callable[..., Any]:
            adapter = model.adapter()
            transformer = adapter.pipeline.transformer
            transformer.set_attention_backend(backend)
            if lora_path is not None:
                adapter.pipeline.load_lora_weights(str(lora_path), adapter_name="variant")
                # With the scheduler the variant names, as its card's example sets it.
                changes = dict(spec.variants[case.variant].scheduler)
                if changes:
                    own = adapter.pipeline.scheduler
                    adapter.pipeline.scheduler = type(own).from_config(own.config, **changes)
            if compiled:
                transformer.compile_repeated_blocks(fullgraph=True)
                for index, size in enumerate(warm_sizes):
                    _warm(adapter, spec, size, WARM_PROMPTS[index % len(WARM_PROMPTS)], None)
            techniques = {"compile_regional": float(compiled), f"attention_{backend}": 1.0}
            return job(adapter, row, False, cached, techniques)

        return make

    def fleet(slot_on: bool = False, **overrides: Any):
        def make(row: Any) -> Callable[..., Any]:
            if overrides.get("fp8") == "on" and (reason := fp8_refused(device.name)):
                raise g.Skip(reason)
            if overrides.get("cuda_graphs") == "on" and (reason := cuda_graphs_refused(True, device.name)):
                raise g.Skip(reason)
            adapter = model.adapter()
            settings = Settings(
                compile_profile="compile",
                lora_cache_dir=work / "lora-cache",
                warm_sizes={spec.key: warm_sizes},
                variant_weights={f"{spec.key}:{case.variant}": str(variant_path)} if variant_path else {},
                variant_lora_rank=64 if not device.cpu else 4,
                **overrides,
            )
            speed = prepare(adapter, spec, VramClass.GPU80, settings)
            if overrides.get("fused_qkv") == "on" and not speed.fused:
                raise g.Skip("the transformer runs no fused QKV projections (the worker's log says why)")
            if slot_on:
                speed.switch_slots(True)
            return job(adapter, row, True, case.cache is not None, None)

        return make

    makers: dict[str, Callable[[Any], Callable[..., Any]]] = {
        "stock": stock(),
        # The deviation floor: stock on another SDPA kernel (memory-efficient against flash).
        "stock-kernel": stock(backend="_native_math" if device.cpu else "_native_efficient"),
        "stock-compile": stock(compiled=True),
        "stock+cache": stock(cached=True),
        "lora-slot-on": fleet(slot_on=True, attention_backend="native"),
        "fleet": fleet(),
        "fleet+fp8": fleet(fp8="on"),
        "fleet+cuda-graphs": fleet(cuda_graphs="on"),
        "fleet+te-compile": fleet(compile_text_encoder="on"),
        "fleet+fused-qkv": fleet(fused_qkv="on"),
    }
    backends = CPU_ATTENTION if device.cpu else available_backends()
    names = expand_rows(case, wanted, backends)
    rows: list[Any] = []
    first_steps = 1 if case.scope == "step" else 2
    for name in names:
        make = (
            stock(backend=name.split(":", 1)[1], compiled=True)
            if name.startswith("attention:")
            else makers[name]
        )
        if name != "stock" and g.past(deadline):
            make = g.out_of_time
        g.build_row(name, make, rows, device, first_steps, timed=name != "stock-kernel")
    runs = g.time_rows(device, rows, runs, deadline)
    by_name = {row.name: row for row in rows}
    for name in ("stock", "fleet"):
        row = by_name.get(name)
        if row is None or row.call is None or row.error or g.past(deadline):
            continue
        short = 1 if case.scope == "step" else 2
        sizes = [(width, height, frames)] + (warm_sizes if name == "fleet" else [])
        for size in sizes:
            label = "x".join(str(n) for n in size if n)
            row.peak_reserved_gib[label] = device.reserved_gib_second_call(
                lambda row=row, size=size, short=short: row.call(0, size, short)
            )
    return summarize(case, device, rows, runs, model.build_s, (width, height, frames), steps)


SEED_IMAGES = 11


def available_backends() -> tuple[str, ...]:
    """The attention backends of ``ATTENTION`` whose requirements this install meets."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    found = []
    for name in ATTENTION:
        try:
            _check_attention_backend_requirements(AttentionBackendName(name))
            found.append(name)
        except Exception:  # noqa: BLE001 - a backend this install lacks
            continue
    return tuple(found)


# -- S2V: the official DiT ---------------------------------------------------------------------


def s2v_case(
    case: Case, device: Any, wanted: list[str] | None, runs: int, trace: bool, deadline: float | None = None
) -> dict:
    import gpu_speed_rows as g
    import torch
    from accelerate import init_on_device
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from testkit.small_models import s2v as small
    from worker.adapters.wan_s2v.official import import_wan_modules

    started = time.perf_counter()
    modules = import_wan_modules()
    config = modules["configs"].WAN_CONFIGS["s2v-14B"]
    settings = {k: v for k, v in dict(config.transformer).items() if k != "__name__"}
    if device.cpu:
        settings.update(small.DIT, audio_dim=small.AUDIO_DIM)
        width, height = 128, 64
    else:
        width, height = case.size[:2]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(device.dtype)
    try:
        with init_on_device(torch.device(device.name), include_buffers=False):
            torch.manual_seed(0)
            dit = modules["model_s2v"].WanModel_S2V(**settings).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    g.fill_zeros(dit)
    build_s = round(time.perf_counter() - started, 1)
    frames, motion = 80, config.transformer.motion_frames
    lat_motion = (motion + 3) // 4
    lat_frames = (frames + 3 + motion) // 4 - lat_motion
    latent = (height // 8, width // 8)
    gen = torch.Generator(device=device.name).manual_seed(0)
    dtype = device.dtype

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, device=device.name, dtype=dtype, generator=gen)

    noise = randn(16, lat_frames, *latent)
    contexts = [randn(length, 4096) for length in (24, 120, 400)]  # prompts of three lengths
    kwargs = dict(
        t=torch.tensor([999.0], device=device.name),
        seq_len=lat_frames * latent[0] * latent[1] // 4,
        cond_states=randn(1, 16, lat_frames, *latent),
        motion_latents=randn(1, 16, lat_motion, *latent),
        ref_latents=randn(1, 16, 1, *latent),
        audio_input=randn(1, 25, settings["audio_dim"], frames),
        motion_frames=[motion, lat_motion],
        drop_motion_frames=False,
    )

    @contextlib.contextmanager
    def tf32(on: bool) -> Iterator[None]:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def forward(model: Any, kernel: Any, tf32_on: bool) -> Callable[..., Any]:
        def call(index: int, size: Any = None, steps: Any = None) -> Any:
            autocast = contextlib.nullcontext() if device.cpu else torch.amp.autocast("cuda", dtype=dtype)
            with torch.no_grad(), autocast, tf32(tf32_on), kernel():
                return model([noise], context=[contexts[index]], **kwargs)[0]

        return call

    def sdpa(*backends: Any) -> Callable[[], Any]:
        return (lambda: sdpa_kernel(list(backends))) if backends else contextlib.nullcontext

    def make(compiled: bool = False, cudnn: bool = False, tf32_on: bool = False, kernel: Any = None):
        def build(row: Any) -> Callable[..., Any]:
            if cudnn and device.cpu:
                raise g.Skip("cuDNN attention is CUDA's")
            model = dit
            if compiled:
                model = g.shared_copy(dit)
                for block in model.blocks if trace or not device.cpu else []:  # as cpu_compile
                    block.compile(**({"backend": "eager"} if device.cpu else {}))
            chosen = kernel or (sdpa(SDPBackend.CUDNN_ATTENTION) if cudnn else sdpa())
            call = forward(model, chosen, tf32_on)
            if compiled:  # warmed at the case's size, prompts of two lengths
                call(0)
                call(1)
            row.techniques = {"compile_regional": float(compiled), "attention_cudnn": float(cudnn)}
            row.techniques["tf32"] = float(tf32_on)
            return call

        return build

    floor_kernel = sdpa(SDPBackend.MATH if device.cpu else SDPBackend.EFFICIENT_ATTENTION)
    makers = {
        "stock": make(),
        "stock-kernel": make(kernel=floor_kernel),
        "tf32": make(tf32_on=True),
        "cudnn": make(cudnn=True),
        "compile": make(compiled=True),
        "compile+tf32+cudnn": make(compiled=True, cudnn=True, tf32_on=True),
    }
    rows: list[Any] = []
    for name in expand_rows(case, wanted, ()):
        make = g.out_of_time if name != "stock" and g.past(deadline) else makers[name]
        g.build_row(name, make, rows, device, None, timed=name != "stock-kernel")
    runs = g.time_rows(device, rows, runs, deadline)
    stock_row = rows[0]
    if stock_row.call is not None and not stock_row.error and not g.past(deadline):
        stock_row.peak_reserved_gib[f"{width}x{height}"] = device.reserved_gib_second_call(
            lambda: stock_row.call(0)
        )
    result = summarize(case, device, rows, runs, build_s, (width, height, frames), 1)
    result["fleet_row"] = "stock"  # the group runs the official code as stock does, its profile all off
    return complete(case, result)


# -- results -----------------------------------------------------------------------------------


def summarize(
    case: Case, device: Any, rows: list[Any], runs: int, build_s: float, size: Any, steps: int
) -> dict:
    import diffusers
    import gpu_speed_rows as g
    import torch

    by_name = {row.name: row for row in rows}
    stock = by_name["stock"]
    floor = by_name.get("stock-kernel")
    floor_dev = g.deviation(floor.output, stock.output) if floor and floor.output is not None else {}
    summaries = {}
    for row in rows:
        if row.name == "stock-kernel":
            continue
        summary = row.summary(stock if row is not stock else None)
        if "deviation" in summary:
            summary["lossless"] = g.no_worse(summary["deviation"], floor_dev)
        summary |= {"device": device.label, "date": TODAY}
        summaries[row.name] = summary
    result = {"key": case.key, "device": device.label, "torch": torch.__version__}
    result |= {"diffusers": diffusers.__version__, "date": TODAY, "runs": runs}
    result |= {"size": list(size), "steps": steps, "build_s": build_s, "floor": floor_dev, "rows": summaries}
    return complete(case, result)


def complete(case: Case, result: dict) -> dict:
    """The case's headline figures from its rows (again after rows of two runs are merged)."""
    rows = result["rows"]

    def median(name: str) -> float | None:
        return rows.get(name, {}).get("median_s")

    fleet_row = result.get("fleet_row", "fleet")
    fleet = rows.get(fleet_row, {})
    result["stock_s"] = median("stock")
    result["stock_compiled_s"] = median("stock-compile")
    result["fleet_s"] = median(fleet_row)
    result["spread"] = fleet.get("spread")
    same = fleet_row == "stock"  # the fleet runs stock's code: its output is stock's
    result["lossless"] = True if same and fleet else fleet.get("lossless")
    result["deviation"] = {"identical": True} if same and fleet else fleet.get("deviation")
    result["anchor"], result["goal_s"] = case.anchor, case.goal_s
    result["goal_lossless"] = case.lossless_goal
    cpu = result["device"] == "cpu"
    met = None if cpu or result["fleet_s"] is None else result["fleet_s"] <= case.goal_s
    if met and case.lossless_goal:
        met = bool(result["lossless"])
    result["goal_met"] = met
    if case.note:
        result["note"] = case.note
    return result


def merge(found: dict, run: dict) -> dict:
    """``run``'s cases into ``found``: a case measured before keeps every row not re-run (all of
    them replaced when the card differs)."""
    if run.get("device") == "cpu" and found.get("cases") and found.get("device") not in (None, "cpu"):
        raise ValueError("a CPU run's figures cannot be merged into the GPU results")
    cases = {case["key"]: case for case in found.get("cases", [])}
    for case in run["cases"]:
        old = cases.get(case["key"])
        if old is not None and old.get("device") == case["device"]:
            case["rows"] = old["rows"] | case["rows"]
            case["floor"] = case.get("floor") or old.get("floor")
        cases[case["key"]] = complete(BY_KEY[case["key"]], case) if case["key"] in BY_KEY else case
    order = {case.key: i for i, case in enumerate(CASES)}
    merged = {key: run[key] for key in ("device", "torch", "diffusers", "date")}
    merged["cases"] = sorted(cases.values(), key=lambda c: order.get(c["key"], len(order)))
    return merged


def table(results: dict) -> str:
    """The README's GPU table: every case, measured or not."""
    found = {case["key"]: case for case in results.get("cases", [])}
    lines = [
        "| case | anchor | goal | stock s | stock + compile s | fleet s (spread) | deviation from stock (floor) | measured on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        got = found.get(case.key)
        goal = f"≤ {case.goal_s:g} s" + (", lossless" if case.lossless_goal else "")
        if got is None:
            lines.append(
                f"| `{case.key}` | {case.anchor} | {goal} | not measured | not measured | not measured | not measured | no GPU run yet |"
            )
            continue

        def s(value: float | None) -> str:
            return "not measured" if value is None else f"{value:.3f}"

        fleet = s(got["fleet_s"])
        if got["fleet_s"] is not None and got.get("spread") is not None:
            fleet += f" ({got['spread'] * 100:.0f}%)" + (" **met**" if got.get("goal_met") else " not met")
        runs = len(got["rows"].get(got.get("fleet_row", "fleet"), {}).get("runs_s", []))
        if got["fleet_s"] is not None and runs < 5:
            fleet += f", {runs} runs (its run stopped at its deadline)"
        dev = got.get("deviation") or {}
        floor = got.get("floor") or {}
        shown = "identical" if dev.get("identical") else ", ".join(f"{k} {v}" for k, v in dev.items())
        shown = (shown or "not measured") + (
            f" ({', '.join(f'{k} {v}' for k, v in floor.items())})" if floor else ""
        )
        if got.get("lossless") is not None:
            shown += ", lossless" if got["lossless"] else ", not lossless"
        lines.append(
            f"| `{case.key}` | {case.anchor} | {goal} | {s(got['stock_s'])} | {s(got['stock_compiled_s'])} "
            f"| {fleet} | {shown} | {got['device']}, torch {got['torch']}, {got['date']} |"
        )
    return "\n".join(lines)


TODAY = datetime.date.today().isoformat()


def run_cases(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Run the cases ``args`` picks; ``save`` gets the run so far after every case."""
    import gpu_speed_rows as g
    import torch

    from testkit.small_models import build

    device = g.Device(args.cpu)
    # Every row's blocks share the block class's code; each row's guards are dynamo cache entries
    # of that code, more than one model's worker ever holds.
    torch._dynamo.config.recompile_limit = 256
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    cases = [case for case in CASES if not args.only or case.key in args.only]
    build(g.SMALL, sorted({c.model for c in cases if c.scope != "dit"}))
    run = {
        "device": device.label,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": TODAY,
    }
    run["cases"] = []
    print(f"device {device.label}, torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    for case in cases:
        rows = expand_rows(case, args.rows, ("_native_cudnn",))
        print(
            f"{case.key}: rows {', '.join(rows)}; ~{estimate_s(case, rows, args.runs):.0f} s on an H200 (estimate)"
        )
    model = None
    context = cpu_compile(args.trace) if args.cpu else contextlib.nullcontext()
    deadline = args.deadline
    with context, tempfile.TemporaryDirectory(prefix="gpu-speed-") as work:
        for case in cases:
            if g.past(deadline):
                print(f"== {case.key}: not run, no time left before --deadline-s ==", flush=True)
                continue
            started = time.perf_counter()
            print(f"== {case.key} ({case.anchor}; goal {case.goal_s:g} s) ==", flush=True)
            if case.scope == "dit":
                model = None
                device.free()
                result = s2v_case(case, device, args.rows, args.runs, args.trace, deadline)
            else:
                if model is None or model.spec.key != case.model:
                    model = None
                    torch._dynamo.reset()
                    device.free()
                    model = g.Model(device, case.model)
                result = diffusers_case(
                    case, model, device, args.rows, args.runs, Path(work), args.trace, deadline
                )
            result["case_s"] = round(time.perf_counter() - started, 1)
            run["cases"].append(result)
            save(run)
            print(
                f"{case.key}: stock {result['stock_s']} s, stock + compile {result['stock_compiled_s']} s, "
                f"fleet {result['fleet_s']} s (goal {case.goal_s:g} s), deviation {result['deviation']} "
                f"(floor {result['floor']}), case took {result['case_s']} s",
                flush=True,
            )
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny configs on the CPU: checks the script")
    parser.add_argument("--trace", action="store_true", help="--cpu: trace the compiled rows with dynamo")
    parser.add_argument("--only", nargs="+", choices=[case.key for case in CASES], metavar="CASE")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="rows to run (stock always runs)")
    parser.add_argument("--runs", type=int, help="timed rounds (default 5; --cpu 2)")
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="seconds from the start: past it no row or case starts, and no round that would end after it",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    )
    parser.add_argument("--plan", action="store_true", help="print the GPU runs, each within --budget-s")
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument(
        "--merge", type=Path, metavar="FILE", help=f"merge a GPU run's file into {RESULTS.name}"
    )
    parser.add_argument("--table", action="store_true", help="print the README's GPU table")
    args = parser.parse_args(argv)
    args.deadline = time.monotonic() + args.deadline_s if args.deadline_s is not None else None
    if args.plan:
        for keys, rows, seconds in plan(5, args.budget_s):
            print(
                f"--only {' '.join(keys)}"
                + (f" --rows {' '.join(rows)}" if rows else "")
                + f"   # ~{seconds:.0f} s"
            )
        return 0
    committed = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"cases": []}
    if args.table:
        print(table(committed))
        return 0
    if args.merge:
        run = json.loads(args.merge.read_text())
        if run.get("device") == "cpu":
            print(f"{args.merge} is a CPU run: its figures say nothing of a GPU", file=sys.stderr)
            return 2
        RESULTS.write_text(json.dumps(merge(committed, run), indent=1) + "\n")
        return 0
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu to check the script", file=sys.stderr)
        return 2
    args.runs = args.runs or (2 if args.cpu else 5)
    out = (args.out or CPU_OUT) if args.cpu else args.out
    # A CPU run merges into its own file only; a GPU run into the committed one (and a copy).
    base = committed
    if args.cpu:
        path = out / "gpu-speed.json"
        base = json.loads(path.read_text()) if path.exists() else {"cases": []}

    def save(run: dict) -> None:
        merged = merge(base, json.loads(json.dumps(run)))
        text = json.dumps(merged, indent=1) + "\n"
        if not args.cpu:
            RESULTS.write_text(text)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu-speed.json").write_text(text)

    run = run_cases(args, save)
    bad = [
        f"{case['key']} {name}: {row.get('recompiles') or row.get('error')}"
        for case in run["cases"]
        for name, row in case["rows"].items()
        if row.get("recompiles") or (row.get("error") and name in ("stock", "fleet"))
    ]
    for line in bad:
        print(f"ERROR {line}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The rows of bench/gpu_speed.py: a model's components built once for its cases, a copy of the
transformer per row that shares the weights, each row's job, and the measures (timed runs in
A/B/B/A order, graphs compiled, reserved memory, deviation from stock). See bench/gpu_speed.py."""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The one way a bench hands built components to an adapter's from_pretrained (bench/ is on the
# path of the scripts that import this).
from gpu_memory import given_components

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "var" / "small-models"

# Prompts of three lengths, one a round: a graph compiled with one text length kept constant
# would recompile on another.
PROMPTS = (
    "a red fox in the snow",
    "a lighthouse on a rocky coast at dusk, waves breaking on the rocks, a fishing boat coming "
    "home, seagulls over the water, warm light in the windows of the keeper's house",
    "an old market street in the morning: stalls of oranges, lemons and figs under striped "
    "awnings, a baker carrying a tray of bread, two children chasing a dog between the baskets, "
    "pigeons on the roof of the fountain, laundry drying between the balconies, a tram waiting "
    "at the end of the street, long soft shadows, the stones still wet from the night's rain, a "
    "painted sign above a cafe, a woman reading a newspaper at a small round table, steam rising "
    "from her cup, photographed on medium format film with a fifty millimetre lens",
)
SEED = 7
# What a job's timings (or a row) name as run, beside ``attention_<backend>``.
TECHNIQUES = (
    "compile_regional",
    "lora_slot",
    "variant_checkpoint",
    "fp8_linear",
    "cuda_graphs",
    "compile_text_encoder",
    "fused_qkv",
    "tf32",
)
# The class whose profile compiles the diffusers models (resident there).
COMPILED_CLASS = "gpu80"
# --cpu: warm sizes and a case size between them, never warmed (frames for the videos only).
CPU_WARM = [(64, 64, 5), (96, 96, 9)]  # differ in every dimension, as the catalog's do
CPU_SIZE = (64, 96, 9)


class Device:
    """The card (bf16) or, with --cpu, the CPU (float32)."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.name = "cpu" if cpu else "cuda"
        self.dtype = torch.float32 if cpu else torch.bfloat16
        self.label = "cpu" if cpu else torch.cuda.get_device_name()

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize()

    def free(self) -> None:
        import gc

        gc.collect()
        if not self.cpu:
            torch.cuda.empty_cache()

    def reserved_gib_second_call(self, call: Callable[[], object]) -> float | None:
        """Peak reserved bytes of the second of two calls (the first fills the allocator's
        pools); None on the CPU."""
        if self.cpu:
            return None
        self.free()
        call()
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        call()
        self.sync()
        return round(torch.cuda.max_memory_reserved() / 2**30, 2)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with modules of its own (attention processors, LoRA wrappers, compiled
    blocks) holding the very same parameter and buffer tensors: no memory, one set of weights."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def build_on_device(entry: dict[str, Any], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A component of ``routing/memory/configs.json`` at full size with random weights, made on
    ``device`` by its own initialisers; the modules its class keeps in float32 stay so."""
    from worker import memory_build

    cls, config = memory_build._class(entry["class"]), dict(entry["config"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if entry["class"].startswith("transformers."):
                from transformers import AutoConfig

                module = cls._from_config(AutoConfig.for_model(config.pop("model_type"), **config))
                module.tie_weights()
            elif entry["class"].startswith("diffusers."):
                module = cls.from_config(config)
            else:
                module = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    module = module.to(dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    for name, param in module.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
    fill_zeros(module)
    return module.eval().requires_grad_(False)


def fill_zeros(module: torch.nn.Module) -> None:
    """Weights the initialisers left all zero (output heads, gates), drawn at random like the
    rest: a zero head makes every output zero, and the deviation between rows meaningless."""
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() >= 2 and not bool(param.any()):
                param.normal_(0.0, 0.02)


class Model:
    """One diffusers model's components, built once for its cases: full size with random weights
    on the card, or the small model on the CPU. ``adapter()`` loads the fleet's adapter over
    them with a transformer of its own that shares the weights."""

    def __init__(self, device: Device, key: str):
        from routing.catalog import CATALOG
        from worker import memory_build
        from worker.adapters import load_adapter
        from worker.adapters.base import Runtime

        self.device = device
        self.spec = CATALOG[key]
        self.folder = str(SMALL / key)
        self.runtime = Runtime(device.name, device.dtype)
        started = time.perf_counter()
        built: dict[str, Any] = {}
        if not device.cpu:
            for name, entry in memory_build.load_configs()[key].items():
                built[name] = build_on_device(entry, device.name, device.dtype)
        with given_components(built):
            first = load_adapter(self.spec, self.folder, self.runtime)
        self.components = dict(first.pipeline.components)
        self.transformer = self.components["transformer"]  # never run: each row runs a copy
        self.build_s = round(time.perf_counter() - started, 1)
        self._embeddings: dict[str, Any] = {}

    def adapter(self) -> Any:
        from worker.adapters import load_adapter

        with given_components(self.components | {"transformer": shared_copy(self.transformer)}):
            return load_adapter(self.spec, self.folder, self.runtime)

    def wan_embeddings(self, adapter: Any, prompt: str) -> tuple[Any, Any]:
        """A Wan prompt's and the empty negative prompt's embeddings (the real text encoder, once
        a prompt; every row shares the text encoder)."""
        if prompt not in self._embeddings:
            with torch.no_grad():
                self._embeddings[prompt] = adapter.t2v.encode_prompt(
                    prompt=prompt,
                    negative_prompt="",
                    do_classifier_free_guidance=True,
                    max_sequence_length=512,
                    device=self.device.name,
                )
        return self._embeddings[prompt]


@dataclass
class Row:
    """One configuration of a case, timed beside the others."""

    name: str
    call: Callable[..., Any] | None = None  # call(prompt index, size=None, steps=None) -> output
    error: str | None = None
    skipped: str | None = None
    build_s: float = 0.0
    first_s: float | None = None
    first_graphs: int = 0  # graphs compiled by the first call at the case's size
    times: list[float] = field(default_factory=list)
    recompiles: int = 0  # graphs compiled during the timed runs: must stay 0
    output: Any = None
    techniques: dict[str, float] = field(default_factory=dict)
    timed: bool = True  # False: the deviation floor's second kernel, run once
    peak_reserved_gib: dict[str, float | None] = field(default_factory=dict)

    def summary(self, stock: Row | None) -> dict[str, Any]:
        out: dict[str, Any] = {"build_s": self.build_s}
        if self.skipped or self.error:
            return out | {"skipped": self.skipped, "error": self.error}
        if self.times:
            median = statistics.median(self.times)
            out |= {
                "median_s": round(median, 4),
                "spread": round((max(self.times) - min(self.times)) / median, 4),
                "runs_s": [round(t, 4) for t in self.times],
                "first_s": round(self.first_s or 0.0, 3),
                "first_call_graphs": self.first_graphs,
                "recompiles": self.recompiles,
            }
            if stock is not None and stock.times:
                out["ratio_to_stock"] = round(median / statistics.median(stock.times), 4)
                out["stock_s"] = round(statistics.median(stock.times), 4)
        if stock is not None and stock.output is not None and self.output is not None:
            out["deviation"] = deviation(self.output, stock.output)
        out["techniques"] = {
            k: v for k, v in self.techniques.items() if v and (k in TECHNIQUES or k.startswith("attention_"))
        }
        if self.peak_reserved_gib:
            out["peak_reserved_gib"] = self.peak_reserved_gib
        return out


def build_row(
    name: str,
    make: Callable[[Row], Callable[..., Any]],
    rows: list[Row],
    device: Device,
    first_steps: int | None,
    timed: bool = True,
) -> Row:
    """Make a row and make its first call at the case's size, ``first_steps`` steps, before the
    next row is made: the graphs that call compiles are the ones a worker warmed like this row
    (and like the rows made before it: dynamo keeps one cache for a block class's code) would
    compile in its first job at that size. A row that fails to build (a kernel the card lacks,
    memory) is kept with its error and the case goes on without it. An untimed row (the
    deviation floor's) makes its one call in full."""
    row = Row(name, timed=timed)
    started = time.perf_counter()
    try:
        row.call = make(row)
    except Skip as skip:
        row.skipped = str(skip)
    except Exception as exc:  # noqa: BLE001 - a row's failure is its result
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    row.build_s = round(time.perf_counter() - started, 1)
    rows.append(row)
    if row.call is not None:
        graphs = compiled_graphs()
        device.sync()
        started = time.perf_counter()
        steps = first_steps if timed else None
        output = _safely(row, lambda: row.call(0, None, steps))
        device.sync()
        row.first_s, row.first_graphs = time.perf_counter() - started, compiled_graphs() - graphs
        if not timed:
            row.output = output
    print(
        f"  row {name}: "
        + (f"skipped ({row.skipped})" if row.skipped else f"FAILED {row.error}" if row.error else "ready")
        + f" in {row.build_s:.1f} s"
        + (
            f", first call {row.first_s:.2f} s ({row.first_graphs} graphs)" if row.first_s is not None else ""
        ),
        flush=True,
    )
    return row


class Skip(Exception):
    """A row the device cannot run, with the reason."""


def _safely(row: Row, function: Callable[[], Any]) -> Any:
    try:
        return function()
    except Exception as exc:  # noqa: BLE001 - a row's failure is its result
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"  row {row.name} FAILED: {row.error}", flush=True)
        return None


def past(deadline: float | None) -> bool:
    """Whether ``deadline`` (``time.monotonic()``; None: none) has passed."""
    return deadline is not None and time.monotonic() >= deadline


def out_of_time(row: Row) -> Any:
    """A row's maker once the run's deadline has passed: skipped, saying so."""
    raise Skip("no time left before --deadline-s")


def time_rows(device: Device, rows: list[Row], runs: int, deadline: float | None = None) -> int:
    """``runs`` rounds in A/B/B/A order (each round the reverse of the last, so a drift in the
    card's clock or temperature falls on every row alike), a prompt length a round; past the
    first, only rounds that end before ``deadline`` (``time.monotonic()``, by the last round's
    length). Returns the rounds timed."""
    live = [row for row in rows if row.call is not None]
    timed = [row for row in live if row.timed and not row.error]
    done, round_s = 0, 0.0
    for round_ in range(runs):
        if done and deadline is not None and time.monotonic() + round_s > deadline:
            print(
                f"  stopped after {done} of {runs} rounds: one more would end past --deadline-s", flush=True
            )
            break
        round_started = time.monotonic()
        index = round_ % len(PROMPTS)
        for row in timed if round_ % 2 == 0 else timed[::-1]:
            if row.error:
                continue
            graphs = compiled_graphs()
            device.sync()
            started = time.perf_counter()
            output = _safely(row, lambda row=row, index=index: row.call(index))
            device.sync()
            if row.error:
                continue
            row.times.append(time.perf_counter() - started)
            row.recompiles += compiled_graphs() - graphs
            if index == 0:
                row.output = output  # the same prompt and seed in every row: the deviation's
        done, round_s = done + 1, time.monotonic() - round_started
    for row in live:
        if row.times:
            print(
                f"  {row.name:28} median {statistics.median(row.times):8.3f} s  "
                f"min {min(row.times):.3f} max {max(row.times):.3f}  first {row.first_s:.2f} s "
                f"({row.first_graphs} graphs)  recompiles {row.recompiles}",
                flush=True,
            )
    return done


def as_array(output: Any) -> Any:
    """An output as numbers: images and frames as uint8 arrays, tensors as float32."""
    import numpy as np

    if isinstance(output, torch.Tensor):
        return output.detach().float().cpu()
    frames = getattr(output, "images", None) or getattr(output, "frames", None)
    return np.stack([np.asarray(frame.convert("RGB")) for frame in frames])


def deviation(output: Any, reference: Any) -> dict[str, float | None]:
    """PSNR (dB) of decoded pixels, or cosine similarity of latents, against ``reference``."""
    import numpy as np

    a, b = as_array(output), as_array(reference)
    if isinstance(a, torch.Tensor):
        a, b = a.flatten().double(), b.flatten().double()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return {"cosine": None}
        cosine = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))
        return {"cosine": round(cosine, 6)}
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0:
        return {"psnr_db": None, "identical": True}
    return {"psnr_db": round(10 * math.log10(255.0**2 / mse), 2)}


def no_worse(found: dict[str, Any], floor: dict[str, Any]) -> bool | None:
    """Lossless: no further from stock than stock on another kernel is (the floor)."""
    if found.get("identical"):
        return True
    if floor.get("identical"):  # stock gives the same output on either kernel: so must the row
        return False
    for key in ("psnr_db", "cosine"):
        if key in found and key in floor and found[key] is not None and floor[key] is not None:
            return found[key] >= floor[key]
    return None

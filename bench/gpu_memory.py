"""GPU memory of each model at each class's largest request, measured against routing.memory's
prediction, with the process capped to the class's card.

    python bench/gpu_memory.py [--only MODEL ...] [--out DIR]   # one GPU (80 GiB or more)
    python bench/gpu_memory.py --cpu [--only MODEL ...]          # tiny configs on the CPU

For every single-GPU model and every class that runs it (``python -m routing memory``): the
fleet's own adapter is loaded as that class's worker places it (``Runtime.placed``: resident,
model CPU offload, VAE tiling), with full-size components of random weights built from
``routing/memory/configs.json`` (nothing is downloaded: tokenizers, scheduler and processors come
from the small local models), without the worker's speed profile (no LoRA slot, eager: the pool
counts a LoRA slot apart). Classes that place a model alike on cards alike (gpu80 and h100x8's
rank 0) run once. Then ``torch.cuda.set_per_process_memory_fraction`` caps the process
at the class's card (16 GiB for gpu16, 80 GiB for gpu80 and h100x8) and one job of the largest
request the class takes runs with 2 steps (the peak does not grow with steps). Each phase's
peak (``torch.cuda.max_memory_allocated`` between the text encoders, the transformer and the VAE
taking over) is printed beside the prediction; a row passes when the job ran within the card and
the measured peak is at most the predicted one.

S2V runs in an eight-rank torchrun group (FSDP + Ulysses): one GPU cannot measure a rank of it,
so its row prints the prediction per rank, against an 80 GiB H100 rank and a 40 GiB A100 rank
(p4d.24xlarge, whose 37 GB peak the source notes call an out-of-memory risk), marked not run.

``--out DIR`` (default ``$OUT`` when set) gets ``gpu_memory.json``; refresh the memory data from
a GPU run with ``python -m routing.memory.refresh DIR/gpu_memory.json`` (it rewrites the
coefficients of routing/memory/activations.json from the phases measured and names the run).
``--cpu`` checks the script end to end on the small models, 64x64 (9 frames), two steps, once
per placement (no figure: there is no GPU allocator to read); it needs ``make small-models``.
Random weights say nothing of quality.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routing.catalog import CATALOG, ModelSpec  # noqa: E402
from routing.classes import VramClass  # noqa: E402
from routing.memory import (  # noqa: E402
    CARDS,
    Mode,
    Work,
    budget_gib,
    classes_for,
    largest_request,
    placement,
    predict,
)
from routing.memory.model import GIB, activations, tokens  # noqa: E402
from routing.memory.model import _on_gpu as weights_on_gpu  # noqa: E402
from routing.schemas import REQUEST_TYPES, parse_request  # noqa: E402
from worker import memory_build as build  # noqa: E402
from worker.adapters import load_adapter  # noqa: E402
from worker.adapters.base import Inputs, Runtime  # noqa: E402

SMALL = ROOT / "var" / "small-models"
# What a rank of the S2V group is held against besides the class's card: an A100-40GB.
S2V_RANK_GIB = {"h100x8 (H100 80GB rank)": 80.0, "p4d.24xlarge (A100 40GB rank)": 40.0}
PHASES = {"text_encoder": "encode", "image_encoder": "encode", "transformer": "denoise"}


class PhaseMeter:
    """The peak GPU memory of each phase of a pipeline call: the phase changes when another
    component starts; its peak is read, and the counter reset, at each change."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.phase: str | None = None
        self.peaks: dict[str, float] = {}
        self.order: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def watch(self, pipe: Any) -> None:
        for name, phase in PHASES.items():
            module = getattr(pipe, name, None)
            if module is not None:
                self._wrap(module, "forward", phase)
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            self._wrap(vae, "encode", "encode")  # input images and video, before denoising
            self._wrap(vae, "decode", "decode")

    def _wrap(self, owner: Any, method: str, phase: str) -> None:
        original = getattr(owner, method)

        def entered(*args: Any, **kwargs: Any) -> Any:
            self.enter(phase)
            return original(*args, **kwargs)

        had_own = method in vars(owner)  # e.g. an offload hook's forward

        def undo() -> None:
            if had_own:
                setattr(owner, method, original)
            else:
                delattr(owner, method)

        setattr(owner, method, entered)
        self._undo.append(undo)

    def enter(self, phase: str) -> None:
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.order.append(phase)

    def close(self) -> None:
        if self.phase is not None and self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / GIB
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), peak)
            torch.cuda.reset_peak_memory_stats()
        self.phase = None

    def unwatch(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def full_size_components(model: str, cache: dict[str, Any]) -> dict[str, Any]:
    """Every component of ``model`` at full size in host memory, bf16, random weights; one
    already built for another model with the same configuration (the Qwen models share all
    three) is reused from ``cache``, and the cache keeps only this model's."""
    from accelerate.utils import set_module_tensor_to_device

    components, kept = {}, {}
    for name, entry in build.load_configs()[model].items():
        key = json.dumps(entry, sort_keys=True)
        if key in cache:
            components[name] = kept[key] = cache[key]
            continue
        module = build.build_on_meta(entry)
        for param_name, param in list(module.named_parameters()):
            value = torch.empty(param.shape, dtype=torch.bfloat16).normal_(0.0, 0.02)
            set_module_tensor_to_device(module, param_name, "cpu", value=value)
        if hasattr(module, "tie_weights"):
            module.tie_weights()
        components[name] = kept[key] = module.to(torch.bfloat16).eval().requires_grad_(False)
    cache.clear()
    cache.update(kept)
    return components


@contextlib.contextmanager
def given_components(components: dict[str, Any] | None) -> Iterator[None]:
    """diffusers pipelines' ``from_pretrained`` handed ``components`` instead of reading those
    from the (small) model directory: how the adapter is loaded with full-size weights."""
    if not components:
        yield
        return
    import diffusers

    original = diffusers.DiffusionPipeline.from_pretrained.__func__

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        return original(cls, *args, **(components | kwargs))

    diffusers.DiffusionPipeline.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        diffusers.DiffusionPipeline.from_pretrained = classmethod(original)


def request_for(spec: ModelSpec, work: Work, steps: int) -> tuple[Any, Inputs]:
    """A parsed request of ``work`` and made-up inputs of the right shapes."""
    from PIL import Image

    fields: dict[str, Any] = {"model": spec.key, "prompt": "a red fox in the snow", "steps": steps}
    fields |= {"kind": spec.task_kinds[0].value, "width": work.width, "height": work.height}
    fields["guidance_scale"] = spec.default_guidance
    image = Image.new("RGB", (work.width, work.height), "grey")
    inputs: dict[str, Any] = {}
    accepted = REQUEST_TYPES[spec.task_kinds[0]].model_fields
    if "images" in accepted:
        fields["images"] = [{"key": f"inputs/{i}.png"} for i in range(work.input_images)]
        inputs["images"] = [image] * work.input_images
    if "image" in accepted:
        fields["image"] = {"key": "inputs/image.png"}
        inputs["image"] = image
    if spec.video is not None:
        fields["frames"] = work.frames
    if "animate" in spec.task_kinds[0].value:
        fields |= {"mode": "move", "pose_video": {"key": "p.mp4"}, "face_video": {"key": "f.mp4"}}
        inputs["pose_video"] = [image] * work.frames
        inputs["face_video"] = [Image.new("RGB", (512, 512), "grey")] * work.frames
    return parse_request(fields), Inputs(inputs)


def live_parts(adapter: Any) -> dict[str, dict[str, int]]:
    pipe = adapter.pipeline
    return {
        name: build.count(module)
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module) and name in (*PHASES, "vae")
    }


def run_row(spec: ModelSpec, vram_class: VramClass, components: dict[str, Any] | None, cpu: bool) -> dict:
    where = placement(spec, vram_class)
    assert where is not None
    largest = largest_request(spec, vram_class)
    assert largest.work is not None, f"{spec.key} takes no request on {vram_class.value}"
    work = largest.work
    ran = Work(64, 64, 9 if work.frames else 0, work.guidance, work.input_images) if cpu else work
    request, inputs = request_for(spec, ran, steps=2)
    runtime = Runtime.resolve("cpu" if cpu else "cuda", "auto").placed(where)
    weights = str(SMALL / spec.key)
    with given_components(components):
        adapter = load_adapter(spec, weights, runtime)
    card = CARDS[vram_class].gib
    meter = PhaseMeter(cuda=not cpu)
    pipes = [p for p in (adapter.pipeline, getattr(adapter, "i2v", None)) if p is not None]
    for pipe in pipes:
        meter.watch(pipe)
    if not cpu:
        torch.cuda.synchronize()
        torch.cuda.set_per_process_memory_fraction(min(1.0, card * GIB / torch.cuda.mem_get_info()[1]))
        torch.cuda.reset_peak_memory_stats()
    error = None
    try:
        adapter.run(request, inputs, lambda done, total: None)
    except torch.OutOfMemoryError as exc:
        error = f"out of memory: {exc}".splitlines()[0]
    finally:
        meter.close()
        meter.unwatch()
        if not cpu:
            torch.cuda.set_per_process_memory_fraction(1.0)
    parts = live_parts(adapter)
    predicted = predict(spec, vram_class, work)
    assert predicted is not None
    data = activations()["models"][spec.key]
    batch = 2 if work.guidance and data["cfg"] == "batched" else 1
    measured = max(meter.peaks.values(), default=0.0)
    row = {
        "model": spec.key,
        "vram_class": vram_class.value,
        "placement": str(where),
        "mode": where.mode.value,
        "vae_tiling": where.vae_tiling,
        "width": ran.width,
        "height": ran.height,
        "frames": ran.frames,
        "guidance": ran.guidance,
        "input_images": ran.input_images,
        "card_gib": card,
        "budget_gib": budget_gib(vram_class),
        "predicted_gib": predicted.peak_gib,
        "predicted_phase": predicted.phase,
        "measured_gib": None if cpu else round(measured, 2),
        "error": error,
        "phases_seen": meter.order,
        "phases": {
            phase: {
                "peak_gib": round(meter.peaks.get(phase, 0.0), 3),
                "weights_gib": round(weights_on_gpu(parts, where.mode, phase, 1), 3),
                "ktokens": batch * tokens(data, ran) / 1000,
                "decoded_mpx": min(ran.megapixels, data["vae_tile_mpx"])
                if where.vae_tiling
                else ran.megapixels,
                "clip_gib": ran.frames * ran.width * ran.height * 3 * 6 / GIB,
            }
            for phase in ("encode", "denoise", "decode")
        },
    }
    # Every phase must have been seen (on a CPU that is the check), and measured within the prediction.
    seen = {"denoise", "decode"} <= set(meter.order)
    row["pass"] = error is None and seen and (cpu or measured <= predicted.peak_gib)
    shown = "CPU: no figure" if cpu else f"measured {measured:.1f} GiB"
    print(
        f"{spec.key} on {vram_class.value} ({where}), {largest}: {shown}, predicted {predicted.peak_gib:.1f} "
        f"GiB ({predicted.phase}), card {card:g} GiB: {'PASS' if row['pass'] else 'FAIL'}"
        + (f" ({error})" if error else ""),
        flush=True,
    )
    # The components serve the next class too: off with this placement's hooks, back to the host.
    for pipe in pipes:
        pipe.remove_all_hooks()
    for module in (components or {}).values():
        module.to("cpu")
    adapter.close()
    return row


def s2v_rows() -> list[dict]:
    spec = CATALOG["wan2.2-s2v-14b"]
    rows = []
    for vram_class in classes_for(spec):
        largest = largest_request(spec, vram_class)
        predicted = predict(spec, vram_class, largest.work) if largest.work else None
        for rank, gib in S2V_RANK_GIB.items():
            fits = predicted is not None and predicted.peak_gib <= gib
            print(
                f"{spec.key} ({placement(spec, vram_class)}), {largest}: not run (one GPU cannot hold a rank "
                f"of the 8-rank group); predicted {predicted.peak_gib if predicted else '?'} GiB per rank "
                f"against {rank}: {'fits' if fits else 'does not fit'} (estimate)",
                flush=True,
            )
            rows.append(
                {
                    "model": spec.key,
                    "vram_class": vram_class.value,
                    "rank": rank,
                    "card_gib": gib,
                    "predicted_gib": predicted.peak_gib if predicted else None,
                    "measured_gib": None,
                    "pass": None,
                }
            )
    return rows


def main() -> int:
    single = [
        k
        for k, s in CATALOG.items()
        if s.served and all(p.mode is not Mode.SHARDED for p in s.placements.values())
    ]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny configs on the CPU: checks the script")
    parser.add_argument("--only", nargs="+", choices=sorted(single) + ["wan2.2-s2v-14b"])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    )
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu to check the script", file=sys.stderr)
        return 2
    import diffusers

    result: dict[str, Any] = {
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "date": datetime.date.today().isoformat(),
        "points": [],
        "not_run": [],
    }
    print(f"device {result['device']}, {result['versions']}", flush=True)
    cache: dict[str, Any] = {}
    for key in single:
        if args.only and key not in args.only:
            continue
        spec = CATALOG[key]
        components = None if args.cpu else full_size_components(key, cache)
        placed = set()
        for vram_class in classes_for(spec):
            # Classes that place the model alike on cards alike run alike (gpu80 and h100x8's
            # rank 0); on a CPU, every class with the same placement does.
            alike = (placement(spec, vram_class), None if args.cpu else CARDS[vram_class].gib)
            if alike in placed:
                continue
            placed.add(alike)
            result["points"].append(run_row(spec, vram_class, components, args.cpu))
            gc.collect()
            if not args.cpu:
                torch.cuda.empty_cache()
        del components
        gc.collect()
    cache.clear()
    if not args.only or "wan2.2-s2v-14b" in args.only:
        result["not_run"] = s2v_rows()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_memory.json").write_text(json.dumps(result, indent=1))
    failed = [p for p in result["points"] if not p["pass"]]
    print(f"{len(result['points']) - len(failed)} of {len(result['points'])} rows pass", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

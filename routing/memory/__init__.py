"""GPU memory as data: what each model's weights take, what a request adds, and so which class
can run a request and how.

- ``configs.json``: every served model's components at full size (the published configurations).
- ``weights.json``: their weights in bytes, counted by ``worker.memory_build`` on the meta device.
- ``activations.json``: per model, how activations grow with the request, each coefficient
  measured (device, versions, date named) or an estimate (said so).
- ``model.py``: the phases of a pipeline call and the placement modes.

Here: the catalog's placements read per request. A class takes a request when the request's
predicted peak in the class's mode fits its card minus the margin (``FLEET_VRAM_MARGIN_GIB``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from routing.classes import VramClass
from routing.memory.model import (
    CARDS,
    WORKER_MODES,
    Card,
    Mode,
    Placement,
    Prediction,
    Work,
    applies_loras,
    has_data,
    has_experts,
)
from routing.memory.model import predict as _predict
from routing.memory.model import weights_gib as _weights_gib

if TYPE_CHECKING:
    from routing.catalog import ModelSpec

# Guidance turns a second pass on above this scale (Z-Image: any scale above 0; the others run
# their passes one after another, so their peak does not depend on it).
_GUIDANCE_ON_ABOVE = 0.0
# TaskKind.TEXT_TO_IMAGE (routing.catalog imports this module, so not from there).
_TEXT_TO_IMAGE = "text-to-image"
# An edit without a size makes about one megapixel (the pipelines' default).
_EDIT_DEFAULT_SIDE = 1024


def default_margin_gib() -> float:
    from routing.settings import get_settings

    return get_settings().vram_margin_gib


def budget_gib(vram_class: VramClass, margin_gib: float | None = None) -> float:
    """What a request's predicted peak must fit on one card of the class."""
    margin = default_margin_gib() if margin_gib is None else margin_gib
    return CARDS[vram_class].gib - margin


def placement(spec: ModelSpec, vram_class: VramClass) -> Placement | None:
    """How a worker of ``vram_class`` places the model; None: that class does not run it.

    A catalog entry without placements runs resident on its own class and every bigger one.
    """
    if spec.placements:
        return spec.placements.get(vram_class)
    return Placement(Mode.RESIDENT) if vram_class.rank >= spec.vram_class.rank else None


def classes_for(spec: ModelSpec, work: Work | None = None) -> list[VramClass]:
    """The classes that run the model (``work``: that run this request, LoRAs and all),
    smallest first."""
    found = []
    for vram_class in sorted(VramClass, key=lambda c: c.rank):
        where = placement(spec, vram_class)
        if where is not None and (work is None or not work.loras or applies_loras(where)):
            found.append(vram_class)
    return found


def work_of(request: Any, spec: ModelSpec) -> Work:
    """The memory-relevant shape of a request (a parsed request, or anything with its fields).

    A video without a frame count (Animate follows its driving video, S2V its speech) is taken
    at the most the model makes.
    """
    width, height = request.width, request.height
    if width is None or height is None:
        width = height = _EDIT_DEFAULT_SIDE
    frames = 0
    if spec.video is not None:
        clips = getattr(request, "clips", None)
        frames = getattr(request, "frames", None) or (clips * spec.video.frames_step if clips else None)
        frames = frames or spec.video.max_frames
    guidance = getattr(request, "guidance_scale", None)
    guidance = spec.default_guidance if guidance is None else guidance
    images = getattr(request, "images", None)
    return Work(
        width=width,
        height=height,
        frames=frames,
        guidance=guidance > _GUIDANCE_ON_ABOVE,
        input_images=len(images) if images else 0,
        outputs=getattr(request, "num_outputs", 1) or 1,
        loras=bool(getattr(request, "loras", None) or getattr(request, "variant", None)),
        variant=getattr(request, "variant", None),
    )


def predict(spec: ModelSpec, vram_class: VramClass, work: Work) -> Prediction | None:
    """The predicted peak of ``work`` on one GPU of ``vram_class``; None where the class does not
    run the model or the model has no memory data."""
    where = placement(spec, vram_class)
    if where is None or not has_data(spec.key):
        return None
    ranks = _ranks(vram_class) if where.mode is Mode.SHARDED else 1
    return _predict(spec.key, where, work, ranks)


def fits(spec: ModelSpec, vram_class: VramClass, work: Work, margin_gib: float | None = None) -> bool:
    if vram_class not in classes_for(spec, work):
        return False
    found = predict(spec, vram_class, work)
    return found is not None and found.peak_gib <= budget_gib(vram_class, margin_gib)


def smallest_fitting_class(spec: ModelSpec, work: Work, margin_gib: float | None = None) -> VramClass | None:
    for vram_class in classes_for(spec, work):
        if fits(spec, vram_class, work, margin_gib):
            return vram_class
    return None


@dataclass(frozen=True)
class Largest:
    """The largest request a class takes: ``work``, or None when even the smallest does not fit."""

    work: Work | None

    def __str__(self) -> str:
        if self.work is None:
            return "none"
        w = self.work
        images = (
            f", {w.input_images} input image{'s' if w.input_images > 1 else ''}" if w.input_images else ""
        )
        return f"{w.width}x{w.height}" + (f"x{w.frames}" if w.frames else "") + images


def largest_request(spec: ModelSpec, vram_class: VramClass, margin_gib: float | None = None) -> Largest:
    """The largest request of the model's limits the class takes, at the default guidance and
    the most input images that fit at any size: for an image model the largest square (at most
    the pixel limit), for a video model the most frames at its default size (then a smaller size
    if none fit)."""
    size = spec.size
    guidance = spec.default_guidance > _GUIDANCE_ON_ABOVE
    if spec.video is None:
        # An edit-only model takes at least one image; a model that also generates, none.
        fewest = 0 if _TEXT_TO_IMAGE in spec.task_kinds or not spec.max_input_images else 1
        for images in range(spec.max_input_images, fewest - 1, -1):
            for side in _sides(spec, size.max_side):
                work = Work(side, side, 0, guidance, images)
                if fits(spec, vram_class, work, margin_gib):
                    return Largest(work)
        return Largest(None)
    # The largest size the model makes (S2V: from its fixed list).
    width, height = max(
        spec.allowed_sizes or [(size.default_width, size.default_height)], key=lambda s: s[0] * s[1]
    )
    for frames in _frame_counts(spec):
        work = Work(width, height, frames, guidance)
        if fits(spec, vram_class, work, margin_gib):
            return Largest(work)
    return Largest(None)


def limit_message(spec: ModelSpec, work: Work, margin_gib: float | None = None) -> tuple[str, str]:
    """(field, message) refusing ``work`` that no class fits, naming the largest that would."""
    classes = classes_for(spec, work)
    if not classes:
        return "loras", f"{spec.key} runs LoRAs and variants on no class: send the job without them"
    top = classes[-1]
    predicted = predict(spec, top, work)
    budget = budget_gib(top, margin_gib)
    head = (
        f"{spec.key} at {work.width}x{work.height}"
        + (f", {work.frames} frames" if work.frames else "")
        + (" with LoRAs or a variant" if work.loras and classes != classes_for(spec) else "")
        + f" needs a predicted {predicted.peak_gib if predicted else '?'} GiB of GPU memory; the largest "
        f"class that runs it ({top.value}, {placement(spec, top)}) has {budget:g} GiB "
        f"({CARDS[top].gib:g} GiB card less the {CARDS[top].gib - budget:g} GiB margin)"
    )
    if work.frames and spec.video is not None:
        for frames in _frame_counts(spec, below=work.frames):
            if fits(spec, top, replace(work, frames=frames), margin_gib):
                return "frames", f"{head}: at this size, at most {frames} frames"
    aspect = work.width / work.height
    for side in _sides(spec, max(work.width, work.height) - spec.size.multiple_of):
        width, height = _scaled(spec, side, aspect)
        if fits(spec, top, replace(work, width=width, height=height), margin_gib):
            return "width", f"{head}: at most {width}x{height} at this aspect ratio"
    return "model", f"{head}: no size fits"


def footprint_gb(spec: ModelSpec, vram_class: VramClass, margin_gib: float | None = None) -> float | None:
    """GPU memory the model takes on a worker of ``vram_class`` when it runs the largest request
    that class takes (GiB): what the worker's pool budgets. None where the class does not run it."""
    largest = largest_request(spec, vram_class, margin_gib)
    if largest.work is None:
        return None
    found = predict(spec, vram_class, largest.work)
    return found.peak_gib if found else None


@dataclass(frozen=True)
class Row:
    model: str
    vram_class: str
    mode: str
    weights_gib: float  # all the model's weights (per rank when sharded)
    largest: str
    peak_gib: float
    card_gib: float
    budget_gib: float
    phase: str
    measured: bool


def table(specs: list[ModelSpec], margin_gib: float | None = None) -> Iterator[Row]:
    """Per model and class that runs it: the mode, the weights, the largest request the class
    takes and its predicted peak."""
    for spec in specs:
        for vram_class in classes_for(spec):
            where = placement(spec, vram_class)
            largest = largest_request(spec, vram_class, margin_gib)
            found = predict(spec, vram_class, largest.work) if largest.work else None
            sharded = where is not None and where.mode is Mode.SHARDED
            yield Row(
                model=spec.key,
                vram_class=vram_class.value,
                mode=str(where),
                weights_gib=round(
                    _weights_gib(spec.key, Mode.SHARDED if sharded else Mode.RESIDENT, _ranks(vram_class)), 2
                ),
                largest=str(largest),
                peak_gib=found.peak_gib if found else 0.0,
                card_gib=CARDS[vram_class].gib,
                budget_gib=budget_gib(vram_class, margin_gib),
                phase=found.phase if found else "",
                measured=bool(found and found.measured),
            )


@dataclass(frozen=True)
class ModeRow:
    model: str
    mode: str
    request: str
    weights_on_gpu_gib: float  # between jobs
    peak_gib: float
    measured: bool
    applied_by_workers: bool
    needs_fp8_card: bool


def modes_table(specs: list[ModelSpec]) -> Iterator[ModeRow]:
    """Every single-GPU placement mode's footprint for each model at its default request, and
    for a model the torchrun group runs the sharded one, per rank of eight (S2V runs only there):
    what an operator weighs when choosing one."""
    for spec in specs:
        if not has_data(spec.key):
            continue
        size = spec.size
        frames = spec.video.default_frames if spec.video else 0
        work = Work(
            size.default_width, size.default_height, frames, spec.default_guidance > _GUIDANCE_ON_ABOVE
        )
        sharded_only = bool(spec.placements) and all(p.mode is Mode.SHARDED for p in spec.placements.values())
        modes = [m for m in Mode if m is not Mode.SHARDED] if not sharded_only else []
        if any(p.mode is Mode.SHARDED for p in spec.placements.values()):
            modes.append(Mode.SHARDED)
        if not has_experts(spec.key):
            modes = [m for m in modes if m is not Mode.EXPERT_OFFLOAD]
        for mode in modes:
            for tiling in (False, True) if mode is Mode.MODEL_OFFLOAD else (False,):
                where = Placement(mode, vae_tiling=tiling)
                ranks = 8 if mode is Mode.SHARDED else 1
                found = _predict(spec.key, where, work, ranks)
                yield ModeRow(
                    model=spec.key,
                    mode=str(where),
                    request=str(Largest(work)),
                    weights_on_gpu_gib=round(_weights_gib(spec.key, mode, ranks), 2),
                    peak_gib=found.peak_gib,
                    measured=found.measured,
                    applied_by_workers=mode in WORKER_MODES,
                    needs_fp8_card=mode is Mode.FP8,
                )


def _ranks(vram_class: VramClass) -> int:
    return vram_class.vram_gb // vram_class.gpu_vram_gb


def _sides(spec: ModelSpec, start: int) -> Iterator[int]:
    """Sides from ``start`` down, multiples of the model's, within its pixel limit."""
    size = spec.size
    side = min(start, size.max_side) // size.multiple_of * size.multiple_of
    while side >= size.min_side:
        if side * side <= size.max_pixels:
            yield side
        side -= size.multiple_of


def _scaled(spec: ModelSpec, side: int, aspect: float) -> tuple[int, int]:
    """A size whose longer side is ``side`` at ``aspect``, snapped to the model's multiple."""
    m = spec.size.multiple_of
    if aspect >= 1:
        return side, max(m, round(side / aspect / m) * m)
    return max(m, round(side * aspect / m) * m), side


def _frame_counts(spec: ModelSpec, below: int | None = None) -> Iterator[int]:
    video = spec.video
    assert video is not None
    frames = video.max_frames if below is None else below - video.frames_step
    while frames >= max(video.frames_offset, 1):
        yield frames
        frames -= video.frames_step


__all__ = [
    "CARDS",
    "WORKER_MODES",
    "Card",
    "Largest",
    "Mode",
    "ModeRow",
    "Placement",
    "Prediction",
    "Row",
    "Work",
    "applies_loras",
    "budget_gib",
    "classes_for",
    "fits",
    "footprint_gb",
    "largest_request",
    "limit_message",
    "modes_table",
    "placement",
    "predict",
    "smallest_fitting_class",
    "table",
    "work_of",
]

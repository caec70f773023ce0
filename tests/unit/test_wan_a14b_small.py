"""The two-expert adapter on the small Wan2.2-T2V-A14B: the expert each step's record names is the
one the pipeline called, and that expert was the one placed on the device when it ran; the parts
it keeps on the device are the ones the catalog's expert-offload placement is priced by."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from routing.catalog import get_model
from routing.classes import VramClass
from routing.memory import Mode, model
from routing.memory.model import weights
from routing.schemas import parse_request
from testkit import small_models
from worker.adapters import wan
from worker.adapters.base import Inputs, Runtime

T2V = "wan2.2-t2v-a14b"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> wan.WanA14BAdapter:
    out = tmp_path_factory.mktemp("small-a14b")
    small_models.build(out, [T2V])
    return wan.WanA14BAdapter(get_model(T2V), str(out / T2V), Runtime(device="cpu", dtype=torch.float32))


def test_each_expert_runs_its_steps_while_it_is_the_one_placed(adapter: wan.WanA14BAdapter):
    calls: list[tuple[str, str]] = []  # (expert called, expert placed at that moment)
    hooks = [
        getattr(adapter.pipe, name).register_forward_hook(
            lambda *_, name=name: calls.append((name, adapter.placement.active))
        )
        for name in ("transformer", "transformer_2")
    ]
    request = parse_request(
        {"model": T2V, "prompt": "a fox", "width": 64, "height": 64, "frames": 5, "steps": 6}
    )
    try:
        video = adapter.run(request, Inputs(), lambda done, total: None)
    finally:
        for hook in hooks:
            hook.remove()
    # Guidance above 1: two passes a step. The high-noise expert's steps come first.
    called = [name for name, _ in calls[::2]]
    high = int(video.timings["expert_high_steps"])
    assert called == ["transformer"] * high + ["transformer_2"] * int(video.timings["expert_low_steps"])
    assert 0 < high < 6 and all(name == placed for name, placed in calls)
    # The next job starts with the high-noise expert placed again.
    adapter.run(request.model_copy(update={"steps": 1}), Inputs(), lambda done, total: None)
    assert adapter.placement.active == "transformer"


def test_the_parts_it_keeps_on_the_device_are_what_expert_offload_counts(adapter: wan.WanA14BAdapter):
    """The catalog places the A14B models in expert-offload on gpu80 (h100x8 shards them in its
    group); the memory model prices that mode by the components it says are on the GPU in each
    phase. The adapter's placement,
    run on a copy of the small pipeline whose components record where they are sent (a device
    name stands for the GPU; nothing moves), sends exactly those there."""
    spec = get_model(T2V)
    assert spec.placements[VramClass.GPU80].mode is Mode.EXPERT_OFFLOAD
    pipe = copy.deepcopy(adapter.pipe)
    names = ("transformer", "transformer_2", "text_encoder", "vae")
    where: dict[str, str] = {}
    for name in names:
        module = getattr(pipe, name)
        module.to = lambda device, *_, name=name, module=module: where.__setitem__(name, device) or module
    placed = wan.ExpertPlacement(pipe, device="the-gpu")

    def on_device() -> set[str]:
        return {name for name in names if where[name] == "the-gpu"}

    parts = weights()[T2V]

    def counted(phase: str) -> set[str]:
        # The components whose bytes the mode counts on the GPU in the phase (the experts are
        # the same size, so the running one stands for either).
        on_gpu = model._on_gpu(parts, Mode.EXPERT_OFFLOAD, phase, 1) * model.GIB
        found = {frozenset(c) for c in _subsets(names) if sum(parts[n]["bytes"] for n in c) == on_gpu}
        return {name.replace("transformer_2", "transformer") for name in max(found, key=len)}

    assert on_device() == {"transformer", "vae"} == counted("denoise") == counted("decode")
    with placed.text_encoder():
        assert on_device() == {"transformer", "vae", "text_encoder"} == counted("encode")
    placed.use("transformer_2")  # the boundary: the low-noise expert comes on, the other goes
    assert on_device() == {"transformer_2", "vae"}
    # The runtime of that class records the mode and refuses to place a pipeline itself.
    runtime = Runtime(device="cpu", dtype=torch.float32).placed(spec.placements[VramClass.GPU80])
    assert runtime.expert_offload and runtime.profile == "expert-offload"
    with pytest.raises(ValueError, match="expert offload"):
        runtime.place(pipe)


def _subsets(names: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]

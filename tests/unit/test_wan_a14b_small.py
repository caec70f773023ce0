"""The two-expert adapter on the small Wan2.2-T2V-A14B: the expert each step's record names is the
one the pipeline called, and that expert was the one placed on the device when it ran."""

from __future__ import annotations

import pytest
import torch

from routing.catalog import get_model
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

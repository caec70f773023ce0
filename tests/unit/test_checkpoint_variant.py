"""A variant that is a whole distilled checkpoint (FastWan2.2-TI2V-5B of Wan2.2-TI2V-5B), on the
small models (eager, CPU): refused at submit with other steps than its own, its DMD sampler's
arithmetic, and a job that runs its 3 fixed timesteps on the checkpoint's weights, swapped into
the resident transformer, giving what that checkpoint loaded as the model gives, with the model's
own jobs bit for bit the same before and after. (Swapped into a compiled transformer, it compiles
nothing: tests/unit/test_compile_profile.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from routing.catalog import CATALOG
from routing.decision import route
from routing.errors import InvalidRequest
from routing.io.storage import LocalStorage
from routing.schemas import parse_request
from routing.settings import Settings
from testkit.small_models.lora import build_checkpoint
from tests.loras import resolved
from worker.adapters.base import Runtime
from worker.adapters.dmd import dmd_scheduler
from worker.adapters.wan import WanTI2VAdapter
from worker.speed import job_context, prepare

SPEC = CATALOG["wan2.2-ti2v-5b"]
RUNTIME = Runtime(device="cpu", dtype=torch.float32)
FASTWAN = SPEC.variants["fastwan-3"]
BASE = {
    "model": SPEC.key,
    "kind": "text-to-video",
    "prompt": "a red fox",
    "width": 64,
    "height": 64,
    "frames": 5,
    "seed": 7,
}


def test_the_variant_runs_its_own_steps_unguided_and_refuses_others_at_submit():
    request = parse_request(BASE | {"variant": "fastwan-3"})
    assert (request.steps, request.guidance_scale) == (3, 1.0)
    assert route(request).vram_class is SPEC.vram_class  # routed like its model
    assert parse_request(BASE | {"variant": "fastwan-3", "steps": 3}).steps == 3
    with pytest.raises(InvalidRequest) as raised:
        parse_request(BASE | {"variant": "fastwan-3", "steps": 4})
    [error] = raised.value.errors
    assert error.field == "steps" and "exactly 3 steps" in error.message and "1000, 757, 522" in error.message


def test_the_dmd_sampler_predicts_the_clean_latents_and_noises_them_afresh():
    scheduler = dmd_scheduler(FASTWAN.dmd_timesteps, torch.Generator().manual_seed(5))
    scheduler.set_timesteps(3)
    assert scheduler.timesteps.tolist() == [1000.0, 757.0, 522.0]
    with pytest.raises(ValueError, match="exactly 3 steps"):
        scheduler.set_timesteps(4)
    scheduler.set_timesteps(3)
    scheduler.set_begin_index(0)
    sample = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    flow = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.Generator().manual_seed(5)  # the job's generator, drawn in the same order
    x = sample
    for t, sigma, next_sigma in ((1000, 1.0, 0.757), (757, 0.757, 0.522), (522, 0.522, 0.0)):
        clean = x - sigma * flow
        fresh = torch.randn(x.shape, generator=noise) if next_sigma else torch.zeros_like(x)
        expected = (1 - next_sigma) * clean + next_sigma * fresh
        x = scheduler.step(flow, torch.tensor(float(t)), x, return_dict=False)[0]
        assert torch.allclose(x, expected, atol=1e-5)
    # The last step is the clean prediction itself.
    assert torch.allclose(x, x - 0.0 * flow)


def _timesteps_seen(transformer: Any) -> list[float]:
    """The largest timestep of each call of ``transformer`` (TI2V passes one per token; the first
    frame's tokens are 0 for image-to-video)."""
    seen: list[float] = []
    transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(kwargs["timestep"].max())), with_kwargs=True
    )
    return seen


def _frames(
    adapter: Any, request: Any, storage: Any, inputs: Any = None
) -> tuple[np.ndarray, dict[str, float]]:
    timings: dict[str, float] = {}
    steps: list[int] = []
    with job_context(adapter, request, storage, timings):
        video = adapter.run(request, inputs or {}, lambda step, total: steps.append(step))
    timings["steps"] = float(len(steps))
    return np.stack([np.asarray(frame) for frame in video.frames]).astype(int), timings


@pytest.fixture(scope="module")
def setup(small_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fastwan")
    model_dir = small_models_dir / SPEC.key
    checkpoint = build_checkpoint(model_dir, tmp / "fastwan", seed=3)
    # The checkpoint loaded as the model: the model's folder with its transformer.
    as_model = tmp / "fastwan-as-model"
    shutil.copytree(model_dir, as_model)
    shutil.rmtree(as_model / "transformer")
    shutil.copytree(checkpoint / "transformer", as_model / "transformer")
    settings = Settings(
        lora_cache_dir=tmp / "lora-cache",
        lora_max_rank=8,
        variant_weights={f"{SPEC.key}:fastwan-3": str(checkpoint)},
    )
    adapter = WanTI2VAdapter(SPEC, str(model_dir), RUNTIME)
    speed = prepare(adapter, SPEC, SPEC.vram_class, settings)
    return {
        "adapter": adapter,
        "speed": speed,
        "as_model": WanTI2VAdapter(SPEC, str(as_model), RUNTIME),
        "storage": LocalStorage(tmp / "objects"),
    }


def test_a_variant_job_runs_the_checkpoints_weights_at_its_timesteps_and_leaves_no_trace(setup):
    adapter, speed, storage = setup["adapter"], setup["speed"], setup["storage"]
    fast_request = parse_request(BASE | {"variant": "fastwan-3"})
    base_request = fast_request.model_copy(update={"variant": None})
    before, timings = _frames(adapter, base_request, storage)
    assert "variant_checkpoint" not in timings
    extra_before = speed.extra_bytes

    seen = _timesteps_seen(adapter.pipeline.transformer)
    fast, timings = _frames(adapter, fast_request, storage)
    assert seen == [1000.0, 757.0, 522.0] and timings["steps"] == 3
    assert timings["variant_checkpoint"] == 1 and "variant_load_s" in timings
    # The checkpoint stays loaded, beside the model's weights, and is counted.
    transformer = adapter.pipeline.transformer
    weights = sum(p.numel() * p.element_size() for n, p in transformer.named_parameters() if "lora_" not in n)
    assert speed.extra_bytes - extra_before == weights

    # What the checkpoint gives loaded as the model, with the same sampler: every weight swapped.
    reference = np.stack(
        [np.asarray(f) for f in setup["as_model"].run(fast_request, {}, lambda s, t: None).frames]
    )
    assert np.abs(fast - reference.astype(int)).max() <= 1
    assert np.abs(fast - before).max() > 10  # and not the model's

    again, timings = _frames(adapter, fast_request, storage)
    assert np.array_equal(again, fast) and "variant_load_s" not in timings  # same seed, same video
    after, timings = _frames(adapter, base_request, storage)
    assert (
        np.array_equal(after, before) and "variant_checkpoint" not in timings
    )  # the model's own weights back


def test_image_to_video_runs_the_variant_too_and_keeps_the_first_frame_clean(setup):
    adapter, storage = setup["adapter"], setup["storage"]
    request = parse_request(
        BASE | {"variant": "fastwan-3", "kind": "image-to-video", "image": {"key": "a.png"}}
    )
    image = Image.new("RGB", (64, 64), (200, 60, 30))
    seen: list[torch.Tensor] = []
    handle = adapter.pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].detach().clone()), with_kwargs=True
    )
    try:
        video, timings = _frames(adapter, request, storage, {"image": image})
    finally:
        handle.remove()
    assert timings["variant_checkpoint"] == 1 and timings["steps"] == 3
    assert [float(t.max()) for t in seen] == [1000.0, 757.0, 522.0]
    assert all(float(t.min()) == 0.0 for t in seen)  # the image's frame: timestep 0, kept as it is
    reference = np.stack(
        [np.asarray(f) for f in setup["as_model"].run(request, {"image": image}, lambda s, t: None).frames]
    )
    assert np.abs(video - reference.astype(int)).max() <= 1


def test_a_checkpoint_that_is_not_the_models_is_refused_naming_what_differs(
    setup, small_models_dir: Path, tmp_path
):
    from worker.checkpoints import CheckpointVariant

    other = build_checkpoint(small_models_dir / "wan2.2-animate-14b", tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="holds a WanAnimateTransformer3DModel"):
        CheckpointVariant(setup["adapter"].pipeline.transformer, str(other))


def test_a_requests_lora_runs_on_the_checkpoint_through_the_slot(setup, small_models_dir: Path, tmp_path):
    from testkit.small_models.lora import build_lora

    adapter, storage = setup["adapter"], setup["storage"]
    lora = build_lora(small_models_dir / SPEC.key, SPEC.key, tmp_path / "style.safetensors", seed=2)
    storage.put("uploads/_/style.safetensors", lora.read_bytes(), "application/octet-stream")
    fast_request = parse_request(BASE | {"variant": "fastwan-3"})
    styled_request = resolved(
        parse_request(BASE | {"variant": "fastwan-3", "loras": [{"source": "uploads/_/style.safetensors"}]}),
        storage,
    )
    fast, _ = _frames(adapter, fast_request, storage)
    styled, timings = _frames(adapter, styled_request, storage)
    assert timings["variant_checkpoint"] == 1 and timings["lora_slot"] == 1
    assert np.abs(styled - fast).max() > 10
    again, timings = _frames(adapter, fast_request, storage)
    assert np.array_equal(again, fast) and timings["lora_slot"] == 0  # the slot off and empty again


def test_a_group_offloaded_transformer_refuses_a_checkpoint_saying_why(
    small_models_dir: Path, tmp_path: Path
):
    """Group offloading onloads each weight from a host copy of its own: a swap would not reach the
    GPU, so it is refused rather than silently running the model's weights."""
    from diffusers import AutoModel

    from worker.checkpoints import CheckpointVariant

    transformer = AutoModel.from_pretrained(str(small_models_dir / SPEC.key), subfolder="transformer")
    transformer.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    checkpoint = build_checkpoint(small_models_dir / SPEC.key, tmp_path / "fastwan", seed=1)
    with pytest.raises(ValueError, match="group-offloaded"):
        CheckpointVariant(transformer, str(checkpoint))

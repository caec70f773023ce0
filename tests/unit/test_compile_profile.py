"""The compile profile on the CPU (inductor), on the smallest model at small sizes, its text encoder
compiled too: outputs equal eager within 2/255 a pixel (float32; inductor reorders sums), a second
job at a warmed size, a job at a size never warmed, a prompt far longer than the warm-up's and a
job with a LoRA hotswapped into the compiled transformer compile nothing (dynamo's count of
graphs), nor does a checkpoint variant's weights swapped into it, base jobs run with the LoRA slot
off and LoRA jobs with it on, and the job after the LoRA (or the checkpoint) is bitwise the one
before it.

Compiling is slow on a shared CPU: one compiled pipeline serves every test here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from routing.catalog import CATALOG
from routing.classes import VramClass
from routing.io.storage import LocalStorage
from routing.schemas import parse_request
from routing.settings import Settings
from testkit.small_models.lora import build_lora
from tests.loras import resolved
from worker.adapters.base import Runtime
from worker.adapters.z_image import ZImageAdapter
from worker.speed import job_context, prepare

pytestmark = pytest.mark.timeout(1800)

SPEC = CATALOG["z-image-turbo"]
# The class whose profile compiles Z-Image: resident on gpu80 (gpu16 offloads it and runs eager).
COMPILED_CLASS = VramClass.GPU80
RUNTIME = Runtime(device="cpu", dtype=torch.float32)
# Z-Image pads its token sequence to a multiple of 32: these sizes give 32 and 64 image tokens,
# two shapes, so the warm-up leaves shape-dynamic blocks; 192x128 (96 tokens) is never warmed.
WARM = [(64, 64, 0), (128, 128, 0)]


def _request(width: int, height: int, **extra: Any) -> Any:
    data = {"model": SPEC.key, "prompt": "a red fox", "width": width, "height": height, "steps": 2, "seed": 3}
    return parse_request(data | extra)


def _run(adapter: Any, request: Any, storage: Any) -> tuple[np.ndarray, dict[str, float]]:
    timings: dict[str, float] = {}
    with job_context(adapter, request, storage, timings):
        image = adapter.run(request, {}, lambda step, total: None).images[0]
    return np.asarray(image).astype(int), timings


@pytest.fixture(scope="module")
def setup(small_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("compile")
    weights = str(small_models_dir / SPEC.key)
    settings = Settings(
        compile_profile="compile",
        warm_sizes={SPEC.key: WARM},
        lora_cache_dir=tmp / "lora-cache",
        lora_max_rank=8,
        compile_text_encoder="on",
    )
    storage = LocalStorage(tmp / "objects")
    lora = build_lora(small_models_dir / SPEC.key, SPEC.key, tmp / "style.safetensors")
    storage.put("uploads/_/style.safetensors", lora.read_bytes(), "application/octet-stream")
    eager = ZImageAdapter(SPEC, weights, RUNTIME)
    prepare(eager, SPEC, COMPILED_CLASS, settings.model_copy(update={"compile_profile": "eager"}))
    compiled = ZImageAdapter(SPEC, weights, RUNTIME)
    speed = prepare(compiled, SPEC, COMPILED_CLASS, settings)
    return {"eager": eager, "compiled": compiled, "speed": speed, "storage": storage}


def test_compiled_output_equals_eager_and_a_warmed_size_compiles_nothing(setup):
    assert setup["speed"].compiled and setup["speed"].warmed == WARM
    # The text encoder's layers are compiled too (FLEET_COMPILE_TEXT_ENCODER=on).
    layers = setup["compiled"].pipeline.text_encoder.layers
    assert setup["speed"].text_encoder_compiled and all(layer._compiled_call_impl for layer in layers)
    for width, height, _ in WARM:
        eager, timings = _run(setup["eager"], _request(width, height), setup["storage"])
        assert timings["compile_text_encoder"] == 0
        compiled, timings = _run(setup["compiled"], _request(width, height), setup["storage"])
        assert np.abs(compiled - eager).max() <= 2
        assert timings["compiled_graphs"] == 0 and timings["compile_regional"] == 1
        assert timings["compile_text_encoder"] == 1


def test_a_size_never_warmed_compiles_nothing(setup):
    _, timings = _run(setup["compiled"], _request(192, 128), setup["storage"])
    assert timings["compiled_graphs"] == 0


def test_a_prompt_longer_than_the_warm_ups_compiles_nothing(setup):
    # Z-Image pads the text to 32 tokens: this prompt is several times that, the warm-up's not.
    prompt = "a red fox in the snow at sunrise, highly detailed photograph, " * 12
    _, timings = _run(setup["compiled"], _request(64, 64, prompt=prompt), setup["storage"])
    assert timings["compiled_graphs"] == 0


def test_a_lora_on_the_compiled_transformer_compiles_nothing(setup):

    storage = setup["storage"]
    before, _ = _run(setup["compiled"], _request(64, 64), storage)
    request = resolved(_request(64, 64, loras=[{"source": "uploads/_/style.safetensors"}]), storage)
    styled, timings = _run(setup["compiled"], request, storage)
    assert timings["compiled_graphs"] == 0 and timings["lora_slot"] == 1
    assert np.abs(styled - before).max() > 10
    after, timings = _run(setup["compiled"], _request(64, 64), storage)
    assert np.array_equal(after, before) and timings["compiled_graphs"] == 0
    assert timings["lora_slot"] == 0  # a base job: the slot is off
    # With the slot on, at a size never warmed: nothing compiles either.
    _, timings = _run(setup["compiled"], request.model_copy(update={"width": 192, "height": 128}), storage)
    assert timings["compiled_graphs"] == 0 and timings["lora_slot"] == 1


def test_a_variants_lora_on_the_compiled_transformer_compiles_nothing(
    setup, small_models_dir: Path, tmp_path
):
    # Z-Image has no variant in the catalog; its slot takes one the way a Qwen-Image worker does.
    slot, storage = setup["speed"].slot, setup["storage"]
    lightning = build_lora(small_models_dir / SPEC.key, SPEC.key, tmp_path / "distilled.safetensors", seed=9)
    before, _ = _run(setup["compiled"], _request(64, 64), storage)
    slot.add_variant("variant-test", str(lightning), 1.0)
    timings: dict[str, float] = {}
    with job_context(setup["compiled"], _request(64, 64), storage, timings):
        slot.apply([slot.variants["variant-test"]])
        setup["speed"].switch_slots(True)  # as a variant job does
        fast = np.asarray(setup["compiled"].run(_request(64, 64), {}, lambda s, t: None).images[0]).astype(
            int
        )
        setup["speed"].switch_slots(False)
        slot.clear()
    assert timings["compiled_graphs"] == 0 and np.abs(fast - before).max() > 10
    after, timings = _run(setup["compiled"], _request(64, 64), storage)
    assert np.array_equal(after, before) and timings["compiled_graphs"] == 0


def test_a_checkpoint_variant_swapped_into_the_compiled_transformer_compiles_nothing(
    setup, small_models_dir: Path, tmp_path
):
    """A checkpoint variant's weights change places with the compiled transformer's (the modules
    stay): the job compiles nothing and gives what the checkpoint loaded as the model gives."""
    import shutil

    from testkit.small_models.lora import build_checkpoint
    from worker.checkpoints import CheckpointVariant

    storage = setup["storage"]
    checkpoint = build_checkpoint(small_models_dir / SPEC.key, tmp_path / "distilled", seed=4)
    as_model = tmp_path / "as-model"
    shutil.copytree(small_models_dir / SPEC.key, as_model)
    shutil.rmtree(as_model / "transformer")
    shutil.copytree(checkpoint / "transformer", as_model / "transformer")
    reference, _ = _run(ZImageAdapter(SPEC, str(as_model), RUNTIME), _request(64, 64), storage)

    before, _ = _run(setup["compiled"], _request(64, 64), storage)
    variant = CheckpointVariant(setup["speed"].transformer, str(checkpoint))
    with variant.swapped_in():
        swapped, timings = _run(setup["compiled"], _request(64, 64), storage)
    assert timings["compiled_graphs"] == 0
    assert np.abs(swapped - reference).max() <= 2 and np.abs(swapped - before).max() > 10
    after, timings = _run(setup["compiled"], _request(64, 64), storage)
    assert np.array_equal(after, before) and timings["compiled_graphs"] == 0


def test_omni_base_takes_a_lora_in_its_compiled_transformer_without_compiling(
    small_models_dir: Path, tmp_path: Path
):
    from worker.adapters.z_image import ZImageOmniAdapter

    spec = CATALOG["z-image-omni-base"]
    # One warm size: one compile, enough for a job at that size (the two-size, shape-dynamic case
    # is Turbo's above, on the same transformer class).
    settings = Settings(
        compile_profile="compile",
        warm_sizes={spec.key: [(64, 64, 0)]},
        lora_cache_dir=tmp_path / "lora-cache",
        lora_max_rank=8,
    )
    storage = LocalStorage(tmp_path / "objects")
    lora = build_lora(small_models_dir / spec.key, spec.key, tmp_path / "style.safetensors")
    storage.put("uploads/_/style.safetensors", lora.read_bytes(), "application/octet-stream")
    adapter = ZImageOmniAdapter(spec, str(small_models_dir / spec.key), RUNTIME)
    speed = prepare(adapter, spec, COMPILED_CLASS, settings)  # offloaded, so eager, on gpu16
    assert speed.compiled and speed.warmed == [(64, 64, 0)]

    data = {"model": spec.key, "kind": "text-to-image", "prompt": "a red fox", "width": 64, "height": 64}
    plain = parse_request(data | {"steps": 2, "seed": 3})
    before, timings = _run(adapter, plain, storage)
    assert timings["compiled_graphs"] == 0 and timings["compile_regional"] == 1
    with_lora = resolved(
        parse_request(data | {"steps": 2, "seed": 3, "loras": [{"source": "uploads/_/style.safetensors"}]}),
        storage,
    )
    styled, timings = _run(adapter, with_lora, storage)
    assert timings["compiled_graphs"] == 0 and np.abs(styled - before).max() > 10
    after, timings = _run(adapter, plain, storage)
    assert np.array_equal(after, before) and timings["compiled_graphs"] == 0

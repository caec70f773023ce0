"""LoRAs on the real small pipelines (eager, CPU): a request's LoRA changes the output, the next
job without one is bit for bit the output of a pipeline that never had a LoRA, the second job with
the same LoRA reads nothing from the store, a variant runs with its steps, its LoRA and its scheduler, and several
LoRAs (or a variant's and a request's) give what diffusers' own multi-adapter LoRAs give."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from producer.inputs import InputLimits, resolve_loras
from producer.tenant_keys import KeyScope
from routing.catalog import CATALOG
from routing.decision import route
from routing.io.net import UrlPolicy
from routing.io.storage import LocalStorage
from routing.schemas import parse_request
from routing.settings import Settings
from testkit.small_models.lora import build_lora
from worker.adapters.base import Runtime
from worker.adapters.qwen_image import QwenImageAdapter, QwenImageEditAdapter, QwenImageEditPlusAdapter
from worker.adapters.z_image import ZImageAdapter, ZImageOmniAdapter
from worker.speed import job_context, prepare

RUNTIME = Runtime(device="cpu", dtype=torch.float32)
# Keys the SDK's no-tenant requests may name: its own uploads.
NO_TENANT = KeyScope("", lambda _: None)


class CountingStorage(LocalStorage):
    """The local store, counting reads: a cache hit must read nothing."""

    reads = 0

    def get(self, key: str) -> bytes:
        self.reads += 1
        return super().get(key)


@pytest.fixture
def storage(tmp_path: Path) -> CountingStorage:
    return CountingStorage(tmp_path / "objects")


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(lora_cache_dir=tmp_path / "lora-cache", lora_max_rank=16, **overrides)


def _run(adapter: Any, request: Any, storage: Any, inputs: Any = None) -> tuple[np.ndarray, dict[str, float]]:
    timings: dict[str, float] = {}
    with job_context(adapter, request, storage, timings):
        generated = adapter.run(request, inputs or {}, lambda step, total: None)
    return np.asarray(generated.images[0]), timings


def _submit(data: dict[str, Any], storage: Any) -> Any:
    """What the API does before queueing: parse, then check and store the LoRAs."""
    return resolve_loras(parse_request(data), storage, UrlPolicy(), InputLimits(lora_max_rank=16), NO_TENANT)


# Each Z-Image model with a LoRA slot: Turbo, the undistilled base with guidance, and Omni-Base
# editing from an input image (its LoRA also reaches the SigLIP refiner blocks).
_EDIT_INPUT = {"images": [Image.new("RGB", (64, 80), (200, 60, 30))]}
LORA_JOBS = [
    ("z-image-turbo", ZImageAdapter, {}, None),
    ("z-image", ZImageAdapter, {"guidance_scale": 4.0, "negative_prompt": "blurry"}, None),
    ("z-image-omni-base", ZImageOmniAdapter, {"kind": "edit", "images": [{"key": "a.png"}]}, _EDIT_INPUT),
]


@pytest.mark.parametrize(
    ("model", "adapter_class", "extra", "inputs"), LORA_JOBS, ids=[j[0] for j in LORA_JOBS]
)
def test_a_lora_changes_the_output_and_leaves_no_trace(
    small_models_dir: Path, tmp_path: Path, storage, model, adapter_class, extra, inputs
):
    spec = CATALOG[model]
    weights = str(small_models_dir / model)
    lora = build_lora(small_models_dir / model, model, tmp_path / "style.safetensors")
    storage.put("uploads/_/style.safetensors", lora.read_bytes(), "application/octet-stream")
    base = {"model": model, "prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 7} | extra
    with_lora = _submit(base | {"loras": [{"source": "uploads/_/style.safetensors", "scale": 1.0}]}, storage)
    plain_request = _submit(base, storage)
    assert with_lora.loras[0].source.startswith("loras/")  # stored by content hash

    never_had_one = adapter_class(spec, weights, RUNTIME)
    reference, _ = _run(never_had_one, plain_request, storage, inputs)

    adapter = adapter_class(spec, weights, RUNTIME)
    speed = prepare(adapter, spec, spec.vram_class, _settings(tmp_path))
    assert speed.slot is not None and speed.extra_bytes > 0
    assert not speed.compiled  # the CPU runs eager unless told

    first, timings = _run(adapter, with_lora, storage, inputs)
    assert np.abs(first.astype(int) - reference.astype(int)).max() > 10
    assert timings["lora_cache_misses"] == 1 and timings["attention_native"] == 1

    after, _ = _run(adapter, plain_request, storage, inputs)
    assert np.array_equal(after, reference)  # bit for bit: the slot holds zeros again

    reads = storage.reads
    again, timings = _run(adapter, with_lora, storage, inputs)
    assert timings["lora_cache_hits"] == 1 and timings["lora_cache_misses"] == 0
    assert storage.reads == reads  # nothing read from the store
    assert np.array_equal(again, first)

    # Half the scale is half the change, not none (several LoRAs: the test below).
    half = _submit(base | {"loras": [{"source": "uploads/_/style.safetensors", "scale": 0.5}]}, storage)
    halved, _ = _run(adapter, half, storage, inputs)
    assert not np.array_equal(halved, first) and not np.array_equal(halved, reference)


# The slot (stacked ranks, scales folded in) against diffusers' own multi-adapter LoRAs: the same
# sum in another order (0 levels of 255 apart on this CPU; the margin is for float rounding
# elsewhere). A dropped LoRA or a wrong scale is more than twice that apart (each test shows it,
# against the same reference: 29 levels at least for Z-Image, 11 for Qwen-Image).
SAME_LEVELS = 2


def _levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _another_lora(lora: Path, out: Path, seed: int) -> Path:
    """A second LoRA for the same layers: ``lora``'s tensors drawn afresh, each with its own
    spread (quicker than building one from the model again)."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    state = load_file(str(lora))
    save_file({k: torch.randn(v.shape, generator=generator) * v.std() for k, v in state.items()}, str(out))
    return out


def _with_adapters(adapter: Any, request: Any, storage: Any, loras: dict[str, float]) -> np.ndarray:
    """``request`` run by diffusers' own adapters on ``adapter``'s pipeline (loaded before)."""
    adapter.pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))
    image, _ = _run(adapter, request, storage)
    return image


def test_several_loras_on_one_job_match_diffusers_multi_adapter_result(
    small_models_dir: Path, tmp_path: Path, storage
):
    """Catches: a LoRA of the list dropped, a scale not applied to its own LoRA, ranks that
    overwrite each other in the slot."""
    weights = str(small_models_dir / "z-image-turbo")
    scales = {"a": 0.6, "b": 1.4}
    first = build_lora(Path(weights), "z-image-turbo", tmp_path / "a.safetensors", seed=1)
    files = {"a": first, "b": _another_lora(first, tmp_path / "b.safetensors", seed=2)}
    for name, path in files.items():
        storage.put(f"uploads/_/{name}.safetensors", path.read_bytes(), "application/octet-stream")
    base = {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 7}
    loras = [{"source": f"uploads/_/{name}.safetensors", "scale": scale} for name, scale in scales.items()]
    request = _submit(base | {"loras": loras}, storage)

    adapter = ZImageAdapter(CATALOG["z-image-turbo"], weights, RUNTIME)
    prepare(adapter, CATALOG["z-image-turbo"], CATALOG["z-image-turbo"].vram_class, _settings(tmp_path))
    merged, _ = _run(adapter, request, storage)

    diffusers_own = ZImageAdapter(CATALOG["z-image-turbo"], weights, RUNTIME)
    for name, path in files.items():
        diffusers_own.pipe.load_lora_weights(str(path), adapter_name=name)
    plain = _submit(base, storage)
    reference = _with_adapters(diffusers_own, plain, storage, scales)
    assert _levels_apart(merged, reference) <= SAME_LEVELS
    # What the tolerance would let through, were the slot wrong: each is well outside it.
    wrongs = ({"a": 0.6}, {"a": 0.6, "b": 1.0})  # b dropped; b at the default scale
    apart = {
        str(w): _levels_apart(_with_adapters(diffusers_own, plain, storage, w), reference) for w in wrongs
    }
    assert min(apart.values()) > 2 * SAME_LEVELS, apart


# The scheduler the Qwen-Image-Lightning LoRAs were distilled with, written out in full as their
# repository's diffusers example has it: shift 3 at every size (mu = log 3), no terminal shift.
LIGHTNING_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# The Qwen-Image models with Lightning variants, each with the adapter and inputs of its kind.
VARIANT_JOBS = [
    ("qwen-image", QwenImageAdapter, {}, None),
    ("qwen-image-edit", QwenImageEditAdapter, {"kind": "edit", "images": [{"key": "a.png"}]}, _EDIT_INPUT),
    (
        "qwen-image-edit-2509",
        QwenImageEditPlusAdapter,
        {"kind": "edit", "images": [{"key": "a.png"}, {"key": "b.png"}]},
        {"images": _EDIT_INPUT["images"] * 2},
    ),
]


@pytest.mark.parametrize(
    ("model", "adapter_class", "extra", "inputs"), VARIANT_JOBS, ids=[j[0] for j in VARIANT_JOBS]
)
def test_a_variant_runs_its_steps_its_lora_and_its_scheduler_on_its_models_class(
    small_models_dir: Path, tmp_path: Path, storage, model, adapter_class, extra, inputs
):
    """A Lightning job runs the variant's steps with its LoRA at the card's scheduler: the
    transformer sees the timesteps of a shift of 3 (not the repository's), and the output is what
    diffusers' own pipeline gives with that LoRA loaded and that scheduler set."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec = CATALOG[model]
    model_dir = small_models_dir / model
    lightning = build_lora(model_dir, model, tmp_path / "lightning.safetensors", seed=3)
    settings = _settings(tmp_path, variant_weights={f"{model}:lightning-8": str(lightning)})
    base = {"model": model, "prompt": "a red fox", "width": 64, "height": 64, "seed": 7} | extra
    request = _submit(base | {"variant": "lightning-8"}, storage)
    variant = spec.variants["lightning-8"]
    assert (request.steps, request.guidance_scale) == (variant.steps, variant.guidance) == (8, 1.0)
    assert route(request).vram_class is spec.vram_class  # routed like its model

    adapter = adapter_class(spec, str(model_dir), RUNTIME)
    speed = prepare(adapter, spec, spec.vram_class, settings)
    slot_bytes = speed.extra_bytes
    steps: list[int] = []
    timings: dict[str, float] = {}
    with job_context(adapter, request, storage, timings):
        fast = np.asarray(
            adapter.run(request, inputs or {}, lambda step, total: steps.append(step)).images[0]
        )
    assert steps == list(range(1, 9)) and "variant_load_s" in timings
    assert speed.extra_bytes > slot_bytes  # the variant's LoRA stays loaded, and is counted
    own_scheduler = adapter.pipe.scheduler
    assert own_scheduler.config.shift_terminal == 0.02  # the repository's, back after the job

    same_steps = request.model_copy(update={"variant": None})
    base_image, _ = _run(adapter, same_steps, storage, inputs)
    assert not np.array_equal(fast, base_image)  # the variant's LoRA took part
    again, timings = _run(adapter, request, storage, inputs)
    assert np.array_equal(again, fast) and "variant_load_s" not in timings  # loaded once, kept

    diffusers_own = adapter_class(spec, str(model_dir), RUNTIME)
    diffusers_own.pipe.load_lora_weights(str(lightning), adapter_name="lightning")
    diffusers_own.pipe.set_adapters(["lightning"], adapter_weights=[variant.lora_scale])
    diffusers_own.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER)
    reference, _ = _run(diffusers_own, same_steps, storage, inputs)
    assert _levels_apart(fast, reference) <= SAME_LEVELS


def _timesteps_seen(transformer: Any) -> list[float]:
    """The timesteps ``transformer`` is called with from now on (the Qwen-Image pipelines pass the
    sigma, t / 1000), one per call."""
    seen: list[float] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(float(kwargs["timestep"].flatten()[0]))

    transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_a_variant_with_a_requests_lora_matches_diffusers_multi_adapter_result(
    small_models_dir: Path, tmp_path: Path, storage
):
    """The variant's LoRA and the request's share the slot (variant rows first). Catches: the
    request's LoRA dropped when a variant is on (or the variant's), the variant's scale or the
    request's lost."""
    model_dir = small_models_dir / "qwen-image"
    lightning = build_lora(model_dir, "qwen-image", tmp_path / "lightning.safetensors", seed=3)
    style = _another_lora(lightning, tmp_path / "style.safetensors", seed=4)
    storage.put("uploads/_/style.safetensors", style.read_bytes(), "application/octet-stream")
    settings = _settings(tmp_path, variant_weights={"qwen-image:lightning-8": str(lightning)})
    base = {"model": "qwen-image", "prompt": "a red fox", "width": 64, "height": 64, "seed": 7}
    lora = [{"source": "uploads/_/style.safetensors", "scale": 3.0}]
    request = _submit(base | {"variant": "lightning-8", "loras": lora}, storage)

    adapter = QwenImageAdapter(CATALOG["qwen-image"], str(model_dir), RUNTIME)
    prepare(adapter, CATALOG["qwen-image"], CATALOG["qwen-image"].vram_class, settings)
    merged, _ = _run(adapter, request, storage)

    variant_scale = CATALOG["qwen-image"].variants["lightning-8"].lora_scale
    diffusers_own = QwenImageAdapter(CATALOG["qwen-image"], str(model_dir), RUNTIME)
    diffusers_own.pipe.load_lora_weights(str(lightning), adapter_name="lightning")
    diffusers_own.pipe.load_lora_weights(str(style), adapter_name="style")
    same_steps = _submit(base | {"variant": "lightning-8"}, storage).model_copy(update={"variant": None})
    from diffusers import FlowMatchEulerDiscreteScheduler

    diffusers_own.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER)
    reference = _with_adapters(diffusers_own, same_steps, storage, {"lightning": variant_scale, "style": 3.0})
    assert _levels_apart(merged, reference) <= SAME_LEVELS
    # (The variant's own LoRA taking part: the test above.)
    wrongs = ({"lightning": variant_scale}, {"lightning": variant_scale, "style": 1.0})
    apart = {
        str(w): _levels_apart(_with_adapters(diffusers_own, same_steps, storage, w), reference)
        for w in wrongs
    }
    assert min(apart.values()) > 2 * SAME_LEVELS, apart


def test_a_hub_id_is_fetched_from_the_hub_through_the_url_guard_only_when_allowed(storage):
    from routing.errors import InvalidRequest

    request = parse_request(
        {"model": "z-image-turbo", "prompt": "a fox", "loras": [{"source": "owner/repo/style.safetensors"}]}
    )
    # The guard sees huggingface.co (here resolving to a private address, so nothing connects).
    policy = UrlPolicy(resolver=lambda host, port: {"huggingface.co": ["10.0.0.1"]}[host])
    for allowed, words in ((False, "FLEET_LORA_HUB is off"), (True, "huggingface.co is refused")):
        with pytest.raises(InvalidRequest) as raised:
            resolve_loras(request, storage, policy, InputLimits(lora_hub=allowed), NO_TENANT)
        [error] = raised.value.errors
        assert error.field == "loras.0.source" and words in error.message


def test_each_request_naming_a_stored_lora_makes_it_young_again(
    small_models_dir: Path, tmp_path: Path, storage
):
    # Stored once by content hash; retention (loras/) counts from the last request that named it.
    lora = build_lora(small_models_dir / "z-image-turbo", "z-image-turbo", tmp_path / "style.safetensors")
    storage.put("uploads/_/style.safetensors", lora.read_bytes(), "application/octet-stream")
    request = {
        "model": "z-image-turbo",
        "prompt": "a fox",
        "loras": [{"source": "uploads/_/style.safetensors"}],
    }
    key = _submit(request, storage).loras[0].source
    stored = storage.root / key
    os.utime(stored, (1_000_000, 1_000_000))

    assert _submit(request, storage).loras[0].source == key
    assert abs(stored.stat().st_mtime - time.time()) < 60
    assert storage.list("loras/") == [key]


def test_a_hotswap_that_fails_part_way_leaves_the_slot_empty(small_models_dir: Path, tmp_path: Path, storage):
    """The slot is cleared whatever happened: a hotswap that wrote some of one tenant's LoRA and
    then failed leaves nothing of it for the next job."""
    weights = str(small_models_dir / "z-image-turbo")
    lora = build_lora(small_models_dir / "z-image-turbo", "z-image-turbo", tmp_path / "style.safetensors")
    storage.put("uploads/_/style.safetensors", lora.read_bytes(), "application/octet-stream")
    base = {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 7}
    with_lora = _submit(base | {"loras": [{"source": "uploads/_/style.safetensors", "scale": 1.0}]}, storage)
    plain_request = _submit(base, storage)
    reference, _ = _run(ZImageAdapter(CATALOG["z-image-turbo"], weights, RUNTIME), plain_request, storage)

    adapter = ZImageAdapter(CATALOG["z-image-turbo"], weights, RUNTIME)
    speed = prepare(
        adapter, CATALOG["z-image-turbo"], CATALOG["z-image-turbo"].vram_class, _settings(tmp_path)
    )
    real_load = speed.slot.pipe.load_lora_weights

    def load_then_fail(*args: Any, **kwargs: Any) -> None:
        real_load(*args, **kwargs)  # the weights are in the slot...
        raise RuntimeError("the device went away mid-copy")  # ...and the hotswap reports failure

    speed.slot.pipe.load_lora_weights = load_then_fail
    with pytest.raises(RuntimeError, match="mid-copy"):
        _run(adapter, with_lora, storage)
    speed.slot.pipe.load_lora_weights = real_load

    after, _ = _run(adapter, plain_request, storage)
    assert np.array_equal(after, reference)  # bit for bit: nothing of the failed LoRA is left


def test_lora_targets_tell_omni_base_loras_from_z_image_ones(small_models_dir: Path, tmp_path: Path, storage):
    from routing.errors import InvalidRequest

    omni = build_lora(
        small_models_dir / "z-image-omni-base", "z-image-omni-base", tmp_path / "omni.safetensors"
    )
    base = build_lora(small_models_dir / "z-image", "z-image", tmp_path / "base.safetensors")
    storage.put("uploads/_/omni.safetensors", omni.read_bytes(), "application/octet-stream")
    storage.put("uploads/_/base.safetensors", base.read_bytes(), "application/octet-stream")
    request = {"model": "z-image", "prompt": "a fox"}
    with pytest.raises(InvalidRequest) as raised:
        _submit(request | {"loras": [{"source": "uploads/_/omni.safetensors"}]}, storage)
    [error] = raised.value.errors
    assert error.field == "loras.0.source"
    assert "made for z-image-omni-base, not z-image: it targets siglip_refiner." in error.message
    # A base LoRA touches only the blocks Omni-Base shares with it, so it runs there too.
    omni_request = {"model": "z-image-omni-base", "kind": "text-to-image", "prompt": "a fox"}
    assert _submit(omni_request | {"loras": [{"source": "uploads/_/base.safetensors"}]}, storage).loras


def test_a_variants_lora_is_found_in_its_own_weights_folder_as_a_model_is(
    small_models_dir: Path, tmp_path: Path, storage
):
    """Without FLEET_VARIANT_WEIGHTS, a worker reads a variant's LoRA from the variant's weights
    folder (``<FLEET_MODEL_ROOT>/<model>:<variant>/<its file>``, where `python -m worker.weights
    pull` puts it and the node cache keeps it), never the hub."""
    spec = CATALOG["qwen-image"]
    variant = spec.variants["lightning-8"]
    lightning = build_lora(small_models_dir / spec.key, spec.key, tmp_path / "lightning.safetensors", seed=3)
    placed = tmp_path / "models" / f"{spec.key}:lightning-8" / variant.lora_file
    placed.parent.mkdir(parents=True)
    placed.write_bytes(lightning.read_bytes())
    request = _submit(
        {
            "model": spec.key,
            "prompt": "a fox",
            "width": 64,
            "height": 64,
            "seed": 7,
            "variant": "lightning-8",
        },
        storage,
    )

    from_folder = QwenImageAdapter(spec, str(small_models_dir / spec.key), RUNTIME)
    prepare(from_folder, spec, spec.vram_class, _settings(tmp_path, model_root=tmp_path / "models"))
    named = QwenImageAdapter(spec, str(small_models_dir / spec.key), RUNTIME)
    prepare(
        named,
        spec,
        spec.vram_class,
        _settings(tmp_path, variant_weights={"qwen-image:lightning-8": str(lightning)}),
    )

    image, timings = _run(from_folder, request, storage)
    assert "variant_load_s" in timings
    assert np.array_equal(image, _run(named, request, storage)[0])

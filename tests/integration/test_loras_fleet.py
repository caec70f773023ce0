"""LoRAs and variants through the fleet: refused at submit with the field named and nothing
queued, or stored by content hash and run by a real worker process, whose second job with the
same LoRA reads it from its own cache; a checkpoint variant (FastWan) run by one, and the model's
own jobs the same bytes before and after."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from producer.client import Client
from routing.errors import InvalidRequest
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from testkit.small_models.lora import build_lora

pytestmark = pytest.mark.integration

GOOD = {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory, small_models_dir: Path) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("loras")
    zimage = build_lora(small_models_dir / "z-image-turbo", "z-image-turbo", out / "z.safetensors")
    qwen = build_lora(small_models_dir / "qwen-image", "qwen-image", out / "q.safetensors")
    buffer = io.BytesIO()
    torch.save({"layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 32)}, buffer)
    return {"z": zimage.read_bytes(), "qwen": qwen.read_bytes(), "pickle": buffer.getvalue()}


def _queued(redis_client) -> int:
    return sum(redis_client.llen(k) for k in redis_client.keys("gpu*") + redis_client.keys("h100x8*"))


@pytest.mark.parametrize(
    ("loras", "field", "words"),
    [
        ([{"source": "uploads/_/pickle.pt"}], "loras.0.source", "a pickle checkpoint"),
        ([{"source": "uploads/_/qwen.safetensors"}], "loras.0.source", "made for qwen-image"),
        ([{"source": "uploads/_/z.safetensors"}] * 4, "loras", "at most 3 LoRAs"),
        ([{"source": "http://127.0.0.1:9/z.safetensors"}], "loras.0.source", "loopback"),
        ([{"source": "http://10.1.2.3/z.safetensors"}], "loras.0.source", "private"),
        ([{"source": "someone/some-lora/lora.safetensors"}], "loras.0.source", "FLEET_LORA_HUB is off"),
        ([{"source": "uploads/_/z.safetensors", "scale": "1"}], "loras.0.scale", "valid number"),
    ],
)
def test_a_bad_lora_is_refused_naming_the_field(
    client: Client, redis_client, lora_files, loras, field, words
):
    for name, data in (("pickle.pt", lora_files["pickle"]), ("qwen.safetensors", lora_files["qwen"])):
        client.storage.put(f"uploads/_/{name}", data, "application/octet-stream")
    client.storage.put("uploads/_/z.safetensors", lora_files["z"], "application/octet-stream")
    before = _queued(redis_client)
    with pytest.raises(InvalidRequest) as raised:
        client.submit(GOOD | {"loras": loras})
    assert any(e.field == field and words in e.message for e in raised.value.errors), raised.value.errors
    assert _queued(redis_client) == before


def test_a_lora_over_the_size_cap_is_refused(fleet_settings, redis_client, lora_files):
    capped = fleet_settings.model_copy(update={"max_lora_bytes": len(lora_files["z"]) - 1})
    with Client(capped) as client:
        client.storage.put("uploads/_/z.safetensors", lora_files["z"], "application/octet-stream")
        with pytest.raises(InvalidRequest) as raised:
            client.submit(GOOD | {"loras": [{"source": "uploads/_/z.safetensors"}]})
    [error] = raised.value.errors
    assert (
        error.field == "loras.0.source" and f"larger than {len(lora_files['z']) - 1} bytes" in error.message
    )


def test_loras_a_model_cannot_take_and_unknown_variants_are_refused(client: Client):
    with pytest.raises(InvalidRequest) as raised:
        client.submit(GOOD | {"variant": "lightning-8"})
    assert (
        raised.value.errors[0].field == "variant"
        and "z-image-turbo has no variant" in raised.value.errors[0].message
    )
    s2v = {"model": "wan2.2-s2v-14b", "image": {"key": "a.png"}, "audio": {"key": "a.wav"}, "prompt": "hi"}
    with pytest.raises(InvalidRequest) as raised:
        client.submit(s2v | {"width": 1024, "height": 704, "loras": [{"source": "uploads/_/z.safetensors"}]})
    assert any(e.field == "loras" and "takes no LoRAs" in e.message for e in raised.value.errors)


def test_a_variant_is_routed_to_its_models_class_with_its_steps(client: Client):
    job = client.submit({"model": "qwen-image", "prompt": "a red fox", "variant": "lightning-4"})
    record = job.get()
    assert record.queue == "gpu80"
    assert record.request["steps"] == 4 and record.request["guidance_scale"] == 1.0


def test_a_worker_applies_a_lora_then_runs_the_base_model_again(
    client: Client, start_worker, fleet_settings, lora_files, tmp_path: Path
):
    upload = client.upload(lora_files["z"])
    assert upload["key"].endswith(".safetensors")
    start_worker(fleet_settings.model_copy(update={"lora_cache_dir": tmp_path / "lora-cache"}))
    storage = LocalStorage(fleet_settings.storage_dir)

    def run(request: dict) -> tuple[bytes, dict[str, float]]:
        record = client.submit(request).wait(timeout_s=300)
        assert record.status is JobStatus.SUCCEEDED, record.error
        return storage.get(record.outputs[0].key), record.timings

    plain, _ = run(GOOD)
    styled, timings = run(GOOD | {"loras": [{"source": upload["key"], "scale": 1.0}]})
    assert styled != plain and timings["lora_cache_misses"] == 1
    again, timings = run(GOOD | {"loras": [{"source": upload["key"], "scale": 1.0}]})
    assert again == styled and timings["lora_cache_hits"] == 1 and timings["lora_cache_misses"] == 0
    after, timings = run(GOOD)
    assert after == plain  # the same PNG bytes: the base weights, exactly
    assert timings["compile_regional"] == 0 and timings["attention_native"] == 1  # the CPU runs eager


def test_a_worker_runs_the_fastwan_checkpoint_variant_then_the_model_again(
    client: Client, start_worker, fleet_settings, small_models_dir: Path, tmp_path: Path, redis_client
):
    from testkit.small_models.lora import build_checkpoint

    base = {
        "model": "wan2.2-ti2v-5b",
        "kind": "text-to-video",
        "prompt": "waves",
        "width": 64,
        "height": 64,
        "frames": 5,
        "seed": 3,
    }
    queued = _queued(redis_client)
    with pytest.raises(InvalidRequest) as raised:
        client.submit(base | {"variant": "fastwan-3", "steps": 8})
    assert raised.value.errors[0].field == "steps" and _queued(redis_client) == queued

    checkpoint = build_checkpoint(small_models_dir / "wan2.2-ti2v-5b", tmp_path / "fastwan", seed=3)
    variants = {"wan2.2-ti2v-5b:fastwan-3": str(checkpoint)}
    start_worker(fleet_settings.model_copy(update={"variant_weights": variants}))
    storage = LocalStorage(fleet_settings.storage_dir)

    def run(request: dict) -> tuple[bytes, dict[str, float], dict]:
        record = client.submit(request).wait(timeout_s=300)
        assert record.status is JobStatus.SUCCEEDED, record.error
        return storage.get(record.outputs[0].key), record.timings, record.request

    plain, timings, _ = run(base | {"steps": 3, "guidance_scale": 1.0})
    assert "variant_checkpoint" not in timings
    fast, timings, request = run(base | {"variant": "fastwan-3"})
    assert (request["steps"], request["guidance_scale"]) == (3, 1.0)
    assert fast != plain and timings["variant_checkpoint"] == 1 and "variant_load_s" in timings
    again, timings, _ = run(base | {"variant": "fastwan-3"})
    assert again == fast and "variant_load_s" not in timings  # read once, kept
    after, _, _ = run(base | {"steps": 3, "guidance_scale": 1.0})
    assert after == plain  # the same MP4 bytes: the model's own weights, exactly

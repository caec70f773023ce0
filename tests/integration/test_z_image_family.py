"""The Z-Image family through the queue: one real gpu80 worker process (it consumes gpu80 and
gpu16) for the whole module, running the real ZImagePipeline and ZImageOmniPipeline on small
random weights. Z-Image with guidance and a negative prompt, Omni-Base generating and editing
from one and two images, a LoRA on each, Turbo's default steps, Z-Image-Edit refused at submit,
and a Z-Image job too big for the 16 GB class queued for the 80 GB class."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from localfleet.process import WorkerProcess
from producer.client import Client
from routing.catalog import get_model
from routing.classes import VramClass
from routing.decision import route
from routing.errors import InvalidRequest
from routing.io.storage import LocalStorage
from routing.jobs.record import JobRecord, JobStatus
from routing.memory import largest_request
from routing.schemas import parse_request
from routing.settings import Settings
from testkit.small_models.lora import build_lora
from tests.conftest import empty_queues
from worker.media import encode_png

pytestmark = pytest.mark.integration

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 5}
Z_IMAGE = {"model": "z-image", "prompt": "a red fox in the snow"} | SMALL
OMNI = {"model": "z-image-omni-base", "prompt": "a red fox in the snow", "steps": 2, "seed": 5}


class Fleet:
    def __init__(self, client: Client, storage: LocalStorage):
        self.client = client
        self.storage = storage

    def run(self, request: dict) -> JobRecord:
        record = self.client.submit(request).wait(timeout_s=300)
        assert record.status is JobStatus.SUCCEEDED, record.error
        return record

    def image(self, record: JobRecord) -> Image.Image:
        [output] = record.outputs
        return Image.open(io.BytesIO(self.storage.get(output.key)))

    def pixels(self, request: dict) -> np.ndarray:
        return np.asarray(self.image(self.run(request)))


@pytest.fixture(scope="module")
def fleet(
    redis_url: str, small_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("z-image-family")
    empty_queues(redis_url)
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"test-{uuid.uuid4().hex[:8]}",
        storage_backend="local",
        storage_dir=tmp / "objects",
        model_root=small_models_dir,
        worker_class="gpu80",
        lora_cache_dir=tmp / "lora-cache",
    )
    worker = WorkerProcess(settings, tmp / "worker.log")
    try:
        worker.wait_ready()
        with Client(settings) as client:
            yield Fleet(client, LocalStorage(settings.storage_dir))
    finally:
        worker.stop()


def picture(hue: int, size: tuple[int, int] = (64, 64)) -> bytes:
    image = Image.new("RGB", size, (hue, 100, 255 - hue))
    ImageDraw.Draw(image).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=(255 - hue, 200, hue))
    return encode_png(image)


def share_differing(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.any(a != b, axis=-1)))


def test_z_image_runs_guidance_with_the_negative_prompt(fleet: Fleet):
    record = fleet.run(Z_IMAGE | {"guidance_scale": 4.0, "negative_prompt": "blurry, low quality"})
    assert fleet.image(record).size == (64, 64)
    assert record.queue == "gpu16" and record.total_steps == 2
    # What ran is on the record, the pipeline's CFG defaults included.
    assert record.request["guidance_scale"] == 4.0
    assert (record.request["cfg_normalization"], record.request["cfg_truncation"]) == (False, 1.0)

    guided = np.asarray(fleet.image(record))
    other_negative = fleet.pixels(Z_IMAGE | {"guidance_scale": 4.0, "negative_prompt": "a city at night"})
    assert share_differing(guided, other_negative) > 0.5  # the negative prompt steers every step
    # Guidance cut off after the first of the two steps changes the second step's prediction.
    truncated = fleet.pixels(
        Z_IMAGE | {"guidance_scale": 4.0, "negative_prompt": "blurry, low quality"} | {"cfg_truncation": 0.2}
    )
    assert share_differing(guided, truncated) > 0.1


def test_turbo_runs_its_8_function_evaluations_by_default(fleet: Fleet):
    record = fleet.run({"model": "z-image-turbo", "prompt": "a fox", "width": 64, "height": 64})
    assert record.request["steps"] == 8 and record.total_steps == 8


def test_omni_base_generates_from_text(fleet: Fleet):
    record = fleet.run(OMNI | {"kind": "text-to-image", "width": 64, "height": 80})
    assert fleet.image(record).size == (64, 80) and record.total_steps == 2


@pytest.mark.parametrize("count", [1, 2])
def test_omni_base_edits_from_its_input_images(fleet: Fleet, count: int):
    sizes = [(80, 64), (64, 96)][:count]
    images = [fleet.client.upload(picture(40 + 90 * i, size)) for i, size in enumerate(sizes)]
    other = fleet.client.upload(picture(230, sizes[0]))
    edit = OMNI | {"kind": "edit", "prompt": "add a hat"}

    first_record = fleet.run(edit | {"images": images})
    first = np.asarray(fleet.image(first_record))
    # Without a size the output follows the last input image.
    assert first.shape[:2] == sizes[-1][::-1]
    again = fleet.pixels(edit | {"images": images})
    assert np.array_equal(first, again)  # the same inputs and seed: the same image
    # Changing the first image changes the output: every input image takes part.
    changed = fleet.pixels(edit | {"images": [other, *images[1:]]})
    assert share_differing(first, changed) > 0.01


@pytest.fixture(scope="module")
def loras(fleet: Fleet, small_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("z-image-loras")
    keys = {}
    for model in ("z-image", "z-image-omni-base"):
        path = build_lora(small_models_dir / model, model, out / f"{model}.safetensors")
        keys[model] = fleet.client.upload(path.read_bytes())["key"]
    return keys


@pytest.mark.parametrize(
    "request_data",
    [Z_IMAGE | {"negative_prompt": "blurry"}, OMNI | {"kind": "text-to-image"} | SMALL],
    ids=["z-image", "z-image-omni-base"],
)
def test_a_lora_job_then_the_base_model_bit_for_bit(fleet: Fleet, loras: dict[str, str], request_data: dict):
    with_lora = request_data | {"loras": [{"source": loras[request_data["model"]], "scale": 1.0}]}
    plain = fleet.pixels(request_data)
    styled_record = fleet.run(with_lora)
    assert styled_record.timings["lora_cache_misses"] == 1
    styled = np.asarray(fleet.image(styled_record))
    assert np.abs(styled.astype(int) - plain.astype(int)).max() > 10
    after = fleet.pixels(request_data)
    assert np.array_equal(after, plain)  # the slot holds zeros again: the base weights, exactly


def test_z_image_edit_is_refused_at_submit_as_not_released(fleet: Fleet):
    image = fleet.client.upload(picture(90))
    with pytest.raises(InvalidRequest) as raised:
        fleet.client.submit({"model": "z-image-edit", "prompt": "add a hat", "images": [image]})
    [error] = raised.value.errors
    assert error.field == "model" and "z-image-edit has not been released yet" in error.message


def test_a_z_image_job_too_big_for_the_16gb_class_goes_to_the_80gb_class(fleet: Fleet):
    # The largest square whose predicted peak (guidance: two batched passes a step) gpu16 holds
    # in its placement (model offload) goes there; one multiple wider goes to gpu80 and runs there.
    edge = largest_request(get_model("z-image"), VramClass.GPU16).work
    assert edge is not None and edge.guidance
    at_edge = {"model": "z-image", "prompt": "a fox", "width": edge.width, "height": edge.height}
    assert route(parse_request(at_edge)).queue == "gpu16"
    record = fleet.run(at_edge | {"width": edge.width + 16, "steps": 1})
    assert record.queue == "gpu80" and record.worker.startswith("gpu80@")
    assert fleet.image(record).size == (edge.width + 16, edge.height)

"""Request validation: defaults from the catalog, limits per model, errors that name fields."""

from __future__ import annotations

import dataclasses

import pytest

from routing import catalog
from routing.catalog import TaskKind
from routing.errors import InvalidRequest
from routing.schemas import TextToImageRequest, parse_request


def test_defaults_come_from_the_catalog_and_are_written_into_the_request():
    request = parse_request({"model": "z-image-turbo", "prompt": "  a fox  "})
    assert isinstance(request, TextToImageRequest)
    assert request.kind is TaskKind.TEXT_TO_IMAGE
    # Turbo's 8 function evaluations are 8 steps in diffusers' ZImagePipeline.
    assert (request.width, request.height, request.steps, request.guidance_scale) == (1024, 1024, 8, 0.0)
    assert request.prompt == "a fox"


def test_a_parsed_request_parses_to_itself():
    request = parse_request({"model": "z-image-turbo", "prompt": "x", "width": 512, "height": 768, "seed": 3})
    assert parse_request(request) == request
    assert parse_request(request.model_dump(mode="json")) == request


def test_every_error_is_reported_at_once():
    with pytest.raises(InvalidRequest) as raised:
        parse_request({"model": "z-image-turbo", "prompt": "x", "width": 100, "height": 30, "steps": 51})
    assert raised.value.fields == ["width", "height", "steps"]


def test_pixel_budget_is_checked_after_each_side():
    from routing.catalog import CATALOG

    limits = CATALOG["wan2.2-ti2v-5b"].size
    assert limits.max_side * limits.max_side > limits.max_pixels  # so the check matters


def test_not_an_object():
    with pytest.raises(InvalidRequest) as raised:
        parse_request(["z-image-turbo"])  # type: ignore[arg-type]
    assert raised.value.fields == ["request"]


def test_model_with_two_kinds_needs_the_kind():
    with pytest.raises(InvalidRequest) as raised:
        parse_request({"model": "wan2.2-ti2v-5b", "prompt": "x"})
    assert raised.value.fields == ["kind"]
    assert "text-to-video, image-to-video" in str(raised.value)


def test_the_z_image_base_models_default_to_guidance_and_their_cfg_options():
    for data in (
        {"model": "z-image", "prompt": "x"},
        {"model": "z-image-omni-base", "kind": "text-to-image", "prompt": "x"},
        {"model": "z-image-omni-base", "kind": "edit", "prompt": "x", "images": [{"key": "a.png"}]},
    ):
        request = parse_request(data)
        assert (request.steps, request.guidance_scale) == (50, 4.0), data
        # The pipelines' defaults, written in so the record says what ran.
        assert (request.cfg_normalization, request.cfg_truncation) == (False, 1.0), data
    request = parse_request(
        {"model": "z-image", "prompt": "x", "cfg_normalization": True, "cfg_truncation": 0.6}
    )
    assert (request.cfg_normalization, request.cfg_truncation) == (True, 0.6)


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (
            {"model": "z-image-turbo", "cfg_normalization": True},
            "cfg_normalization",
            "z-image-turbo does not take",
        ),
        (
            {"model": "qwen-image", "cfg_truncation": 0.5},
            "cfg_truncation",
            "models that do: z-image, z-image-omni-base",
        ),
        ({"model": "z-image", "cfg_truncation": 1.01}, "cfg_truncation", "less than or equal to 1"),
        ({"model": "z-image", "cfg_truncation": -0.01}, "cfg_truncation", "greater than or equal to 0"),
        ({"model": "z-image", "cfg_normalization": "yes"}, "cfg_normalization", "valid boolean"),
        ({"model": "z-image", "steps": 51}, "steps", "at most 50"),
    ],
)
def test_cfg_options_and_steps_are_checked_per_model(data, field, words):
    with pytest.raises(InvalidRequest) as raised:
        parse_request({"prompt": "x"} | data)
    assert [(e.field, words in e.message) for e in raised.value.errors] == [(field, True)], (
        raised.value.errors
    )


def test_omni_base_edits_from_up_to_four_images():
    images = [{"key": f"{i}.png"} for i in range(5)]
    edit = {"model": "z-image-omni-base", "kind": "edit", "prompt": "x"}
    assert len(parse_request(edit | {"images": images[:4]}).images) == 4
    with pytest.raises(InvalidRequest) as raised:
        parse_request(edit | {"images": images})
    assert raised.value.fields == ["images"] and "at most 4 images" in str(raised.value)


def test_z_image_edit_is_listed_and_refused_as_not_released():
    spec = catalog.CATALOG["z-image-edit"]
    assert not spec.served and not spec.released
    with pytest.raises(InvalidRequest) as raised:
        parse_request({"model": "z-image-edit", "prompt": "add a hat", "images": [{"key": "a.png"}]})
    assert raised.value.fields == ["model"]
    assert "z-image-edit has not been released yet" in str(raised.value)


def test_a_model_that_no_worker_runs_is_refused_naming_the_model(monkeypatch) -> None:
    spec = catalog.CATALOG["z-image-turbo"]
    monkeypatch.setitem(catalog.CATALOG, spec.key, dataclasses.replace(spec, served=False))

    with pytest.raises(InvalidRequest) as raised:
        parse_request({"model": spec.key, "prompt": "a red fox"})

    assert raised.value.fields == ["model"]
    assert "not served yet" in str(raised.value)


def test_two_expert_models_fill_in_each_experts_guidance_and_refuse_what_cannot_apply():
    request = parse_request({"model": "wan2.2-t2v-a14b", "prompt": "a fox"})
    assert (request.guidance_scale, request.guidance_scale_2) == (4.0, 3.0)
    assert (request.width, request.height, request.frames) == (1280, 720, 81)
    request = parse_request({"model": "wan2.2-i2v-a14b", "prompt": "a fox", "image": {"key": "a.png"}})
    assert (request.guidance_scale, request.guidance_scale_2) == (3.5, 3.5)
    lightning = parse_request({"model": "wan2.2-t2v-a14b", "prompt": "a fox", "variant": "lightning-4"})
    assert (lightning.steps, lightning.guidance_scale, lightning.guidance_scale_2) == (4, 1.0, 1.0)
    lora = parse_request(
        {"model": "wan2.2-t2v-a14b", "prompt": "a fox", "loras": [{"source": "k", "expert": "low"}]}
    )
    assert lora.loras[0].expert == "low"
    # The pipelines guide both experts or neither, by guidance_scale.
    with pytest.raises(InvalidRequest) as raised:
        parse_request(
            {"model": "wan2.2-t2v-a14b", "prompt": "a", "guidance_scale": 1.0, "guidance_scale_2": 3.0}
        )
    assert raised.value.errors[0].field == "guidance_scale_2"
    with pytest.raises(InvalidRequest) as raised:
        parse_request({"model": "wan2.2-t2v-a14b", "prompt": "a", "frames": 245})
    assert raised.value.errors[0].field == "frames" and "at most 241" in raised.value.errors[0].message


def test_expert_choices_and_a_second_guidance_are_refused_for_one_transformer_models():
    with pytest.raises(InvalidRequest) as raised:
        parse_request({"model": "z-image-turbo", "prompt": "a", "loras": [{"source": "k", "expert": "high"}]})
    [error] = raised.value.errors
    assert error.field == "loras.0.expert" and "wan2.2-t2v-a14b, wan2.2-i2v-a14b" in error.message
    with pytest.raises(InvalidRequest) as raised:
        parse_request(
            {"model": "wan2.2-ti2v-5b", "kind": "text-to-video", "prompt": "a", "guidance_scale_2": 2.0}
        )
    assert raised.value.errors[0].field == "guidance_scale_2"
    with pytest.raises(InvalidRequest) as raised:
        parse_request(
            {"model": "wan2.2-t2v-a14b", "prompt": "a", "loras": [{"source": "k", "expert": "mid"}]}
        )
    assert raised.value.errors[0].field == "loras.0.expert"

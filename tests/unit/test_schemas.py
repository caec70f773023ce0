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
    assert (request.width, request.height, request.steps, request.guidance_scale) == (1024, 1024, 9, 0.0)
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
        parse_request({"model": "wan2.2-t2v-a14b", "prompt": "a", "frames": 85})
    assert raised.value.errors[0].field == "frames" and "at most 81" in raised.value.errors[0].message


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

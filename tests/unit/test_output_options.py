"""The output fields of a request: how many images, their format and quality, the video's CRF,
step caching. Each is checked at submit, with the field named, before anything is queued."""

from __future__ import annotations

from typing import Any

import pytest

from routing.errors import InvalidRequest
from routing.limits import RequestLimits
from routing.schemas import parse_request
from routing.settings import Settings

IMAGE = {"model": "z-image-turbo", "prompt": "a fox"}
VIDEO = {"model": "wan2.2-ti2v-5b", "kind": "text-to-video", "prompt": "a fox"}


def refused(request: dict[str, Any], **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequest) as raised:
        parse_request(request, **kwargs)
    return [(e.field, e.message) for e in raised.value.errors]


def test_defaults_are_one_png_uncached_and_todays_video_encode():
    image = parse_request(IMAGE)
    assert (image.num_outputs, image.output_format, image.output_quality, image.cache) == (
        1,
        "png",
        None,
        None,
    )
    video = parse_request(VIDEO)
    assert (video.output_format, video.video_crf, video.cache) == ("mp4", 18, None)


def test_the_settings_cap_num_outputs_at_its_edge():
    assert Settings().max_num_outputs == 4
    assert parse_request({**IMAGE, "num_outputs": 4}).num_outputs == 4
    assert refused({**IMAGE, "num_outputs": 5}) == [("num_outputs", "must be at most 4 (got 5)")]
    two = RequestLimits(max_num_outputs=2)
    assert parse_request({**IMAGE, "num_outputs": 2}, limits=two).num_outputs == 2
    assert refused({**IMAGE, "num_outputs": 3}, limits=two)[0][0] == "num_outputs"
    assert refused({**IMAGE, "num_outputs": 0})[0][0] == "num_outputs"


def test_the_cap_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLEET_MAX_NUM_OUTPUTS", "1")
    limits = RequestLimits.from_settings(Settings())
    assert refused({**IMAGE, "num_outputs": 2}, limits=limits) == [
        ("num_outputs", "must be at most 1 (got 2)")
    ]


@pytest.mark.parametrize(("output_format", "quality"), [("webp", 90), ("jpeg", 90)])
def test_lossy_formats_get_a_default_quality(output_format, quality):
    request = parse_request({**IMAGE, "output_format": output_format})
    assert request.output_quality == quality
    assert parse_request({**IMAGE, "output_format": output_format, "output_quality": 1}).output_quality == 1
    assert (
        parse_request({**IMAGE, "output_format": output_format, "output_quality": 100}).output_quality == 100
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "jpeg", "output_quality": 0}, "output_quality"),
        ({"output_format": "webp", "output_quality": 101}, "output_quality"),
        ({"output_format": "jpeg", "output_quality": 50.0}, "output_quality"),
        ({"output_quality": 80}, "output_quality"),  # png is lossless
        ({"video_crf": 20}, "video_crf"),  # not an image field
    ],
)
def test_bad_image_output_fields_are_refused_by_name(fields, field):
    assert refused({**IMAGE, **fields})[0][0] == field


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"output_format": "png"}, "output_format"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"output_quality": 90}, "output_quality"),
        ({"num_outputs": 2}, "num_outputs"),
        ({"video_crf": -1}, "video_crf"),
        ({"video_crf": 52}, "video_crf"),
    ],
)
def test_a_video_takes_no_image_format(fields, field):
    assert refused({**VIDEO, **fields})[0][0] == field


def test_video_crf_at_its_edges():
    assert parse_request({**VIDEO, "video_crf": 0}).video_crf == 0
    assert parse_request({**VIDEO, "video_crf": 51}).video_crf == 51


def test_edits_take_a_format_but_make_one_image():
    edit = {"model": "qwen-image-edit", "prompt": "x", "images": [{"key": "uploads/a.png"}]}
    assert parse_request({**edit, "output_format": "webp"}).output_format == "webp"
    assert refused({**edit, "num_outputs": 2})[0] == ("num_outputs", "unknown field")


def test_cache_settings_and_their_bounds():
    request = parse_request({**VIDEO, "cache": {"method": "first_block"}})
    assert (request.cache.method, request.cache.threshold) == ("first_block", 0.1)
    request = parse_request({"model": "qwen-image", "prompt": "x", "cache": {"method": "taylorseer"}})
    assert (request.cache.interval, request.cache.warmup_steps) == (5, 3)
    assert (
        parse_request({**VIDEO, "cache": {"method": "first_block", "threshold": 1.0}}).cache.threshold == 1.0
    )
    for bad in ({"method": "first_block", "threshold": 0.0}, {"method": "first_block", "threshold": 1.01}):
        assert refused({**VIDEO, "cache": bad})[0][0] == "cache.threshold"
    for interval in (1, 11):
        bad = {"method": "taylorseer", "interval": interval}
        assert refused({**VIDEO, "cache": bad})[0][0] == "cache.interval"


def test_a_cache_method_the_model_does_not_support_is_refused():
    assert refused({**IMAGE, "cache": {"method": "first_block"}}) == [
        ("cache.method", "z-image-turbo does not support first_block caching; supported: none")
    ]
    speech = {"model": "wan2.2-s2v-14b", "prompt": "x", "image": {"key": "a"}, "audio": {"key": "b"}}
    assert refused({**speech, "cache": {"method": "taylorseer"}})[0][0] == "cache.method"
    assert refused({**VIDEO, "cache": {"method": "magcache"}}) == [
        ("cache.method", "unknown 'magcache'; known: 'first_block', 'taylorseer'")
    ]

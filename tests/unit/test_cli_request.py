"""The CLI's submit flags become the request the API and SDK take."""

from __future__ import annotations

import pytest

from producer.cli import build_parser, build_request
from routing.errors import InvalidRequest
from routing.schemas import parse_request


def _request(*argv: str) -> dict:
    return build_request(build_parser().parse_args(["submit", *argv]), lambda path: {"key": str(path)})


def test_the_cfg_options_are_flags_sent_only_when_given():
    request = _request("z-image", "--prompt", "a fox", "--cfg-normalization", "--cfg-truncation", "0.5")
    assert (request["cfg_normalization"], request["cfg_truncation"]) == (True, 0.5)
    assert parse_request(request).cfg_normalization is True
    assert _request("z-image", "--prompt", "a fox", "--no-cfg-normalization")["cfg_normalization"] is False
    plain = _request("z-image", "--prompt", "a fox")
    assert "cfg_normalization" not in plain and "cfg_truncation" not in plain
    with pytest.raises(InvalidRequest, match="z-image-turbo does not take cfg_truncation"):
        parse_request(_request("z-image-turbo", "--prompt", "a fox", "--cfg-truncation", "0.5"))


def test_animate_from_a_photo_and_a_video_is_two_files_and_retarget_only_when_given(tmp_path):
    image, video = tmp_path / "me.png", tmp_path / "dance.mp4"
    image.write_bytes(b"png"), video.write_bytes(b"mp4")
    argv = (
        "wan2.2-animate-14b",
        "--mode",
        "move",
        "--prompt",
        "dance",
        "--image",
        str(image),
        "--video",
        str(video),
    )
    request = _request(*argv)
    assert request["video"] == {"key": str(video)} and "retarget" not in request
    assert parse_request(request).video.key == str(video)
    assert _request(*argv, "--retarget")["retarget"] is True

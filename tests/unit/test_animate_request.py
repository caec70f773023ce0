"""The animate request's two forms: a photo and a video, or preprocessing's outputs; never parts of both."""

from __future__ import annotations

import pytest

from routing.errors import InvalidRequest
from routing.schemas import AnimateRequest, parse_request

IMAGE = {"key": "uploads/_/me.png"}
VIDEO = {"key": "uploads/_/dance.mp4"}
PRECOMPUTED = {
    "pose_video": {"key": "uploads/_/pose.mp4"},
    "face_video": {"key": "uploads/_/face.mp4"},
    "background_video": {"key": "uploads/_/bg.mp4"},
    "mask_video": {"key": "uploads/_/mask.mp4"},
}


def _animate(**fields) -> dict:
    return {"model": "wan2.2-animate-14b", "prompt": "dance", "image": IMAGE} | fields


def _refused(data: dict) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        parse_request(data)
    return raised.value


@pytest.mark.parametrize("mode", ["move", "mix"])
def test_a_photo_and_a_video_are_a_whole_request_in_either_mode(mode):
    request = parse_request(_animate(mode=mode, video=VIDEO))
    assert isinstance(request, AnimateRequest) and not request.precomputed
    assert request.video.key == VIDEO["key"] and request.pose_video is None
    assert request.media_fields().keys() == {"image", "video"}


def test_move_takes_retarget_and_mix_refuses_it():
    assert parse_request(_animate(mode="move", video=VIDEO, retarget=True)).retarget is True
    error = _refused(_animate(mode="mix", video=VIDEO, retarget=True))
    assert error.fields == ["retarget"] and "move mode only" in str(error)


def test_the_precomputed_form_is_accepted_as_before():
    move = {name: PRECOMPUTED[name] for name in ("pose_video", "face_video")}
    assert parse_request(_animate(mode="move", **move)).precomputed is True
    mix = parse_request(_animate(mode="mix", **PRECOMPUTED))
    assert mix.video is None and mix.mask_video.key == PRECOMPUTED["mask_video"]["key"]


@pytest.mark.parametrize("given", [["pose_video"], ["face_video", "mask_video"], list(PRECOMPUTED)])
def test_parts_of_both_forms_are_refused_naming_the_precomputed_fields(given):
    error = _refused(_animate(mode="mix", video=VIDEO, **{name: PRECOMPUTED[name] for name in given}))
    assert error.fields == [given[0]]
    assert f"give video, or the precomputed {', '.join(given)}, not both" in str(error)


def test_retarget_without_a_video_is_refused():
    error = _refused(_animate(mode="move", retarget=False, **PRECOMPUTED))
    assert error.fields == ["retarget"] and "retarget needs video" in str(error)


def test_neither_form_names_the_video_and_what_would_do_instead():
    error = _refused(_animate(mode="move"))
    assert error.fields == ["video"]
    assert "video (with image), or the precomputed pose_video, face_video" in str(error)


def test_a_precomputed_form_short_of_a_field_names_the_first_missing():
    error = _refused(
        _animate(mode="mix", pose_video=PRECOMPUTED["pose_video"], face_video=PRECOMPUTED["face_video"])
    )
    assert error.fields == ["background_video"]
    assert "required in mix mode with precomputed inputs: background_video, mask_video" in str(error)


def test_retarget_is_a_boolean_not_a_truthy_value():
    assert _refused(_animate(mode="move", video=VIDEO, retarget="yes")).fields == ["retarget"]

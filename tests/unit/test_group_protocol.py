"""The messages between the group's supervisor and rank 0 (``worker.group.protocol``)."""

from __future__ import annotations

import pytest

from worker.group import protocol


def test_every_message_comes_back_as_it_was_sent():
    sent = [
        protocol.Ready(world_size=2, pids=[11, 12], models=["wan2.2-s2v-14b"]),
        protocol.Job(job_id="j1", model="m", request={"kind": "image"}, inputs={"image": "/x"}, workdir="/w"),
        protocol.Step(job_id="j1", step=1, total=4),
        protocol.Continue(),
        protocol.Stop(),
        protocol.VideoResult(job_id="j1", path="/w/o.mp4", width=2, height=2, frame_count=3, fps=16),
        protocol.ImagesResult(job_id="j1", paths=["/w/o.png"], seed=7),
        protocol.Canceled(job_id="j1", steps=[2]),
        protocol.JobFailed(job_id="j1", message="rank 1: RuntimeError: no"),
        protocol.Broken(message="rank 1 is gone"),
    ]
    assert [protocol.decode(protocol.encode(m)) for m in sent] == sent


def test_an_unknown_message_type_is_refused_naming_it():
    with pytest.raises(protocol.ProtocolError, match=r"unknown message type 'resutl'"):
        protocol.decode({"type": "resutl", "job_id": "j1"})
    with pytest.raises(protocol.ProtocolError, match="not list"):
        protocol.decode(["step"])


def test_a_message_missing_a_field_is_refused_naming_the_field():
    with pytest.raises(protocol.ProtocolError, match=r"'step' message lacks total"):
        protocol.decode({"type": "step", "job_id": "j1", "step": 3})

"""The strings that cross layers: what one process writes, another reads back the same, and
anything else is refused. Metric labels (``routing.jobs.codecs``), as the store and its Lua
scripts write them, and the Celery envelope (``routing.jobs.messages``)."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from producer.client import Client
from routing.celery_config import make_celery
from routing.jobs.codecs import LABEL_SEP, encode_label, parse_label
from routing.jobs.messages import TaskMessages, task_args, task_id
from routing.jobs.record import JobStatus
from routing.settings import Settings


@pytest.mark.parametrize(
    "values",
    [
        ("z-image-turbo", "gpu16"),
        ("wan2.2-ti2v-5b", "gpu80", "succeeded"),
        ("qwen-image", "gpu80", "to_device"),
        ("gpu16", "busy_s"),
        ("wan2.2-s2v-14b", "h100x8", "le", "0.5"),
        ("one",),
    ],
)
def test_labels_round_trip(values):
    label = encode_label(*values)
    assert label == LABEL_SEP.join(values)
    assert parse_label(label) == values
    assert parse_label(label, len(values)) == values


@pytest.mark.parametrize("values", [(), ("",), ("model", ""), ("a|b", "gpu16")])
def test_a_label_value_that_would_not_parse_back_is_refused(values):
    with pytest.raises(ValueError):
        encode_label(*values)


@pytest.mark.parametrize(
    ("label", "count"),
    [("", None), ("model|", None), ("|gpu16", 2), ("model||ok", 3), ("model|gpu16", 3), ("a|b|c|d", 3)],
)
def test_malformed_labels_are_refused(label, count):
    with pytest.raises(ValueError):
        parse_label(label, count)


def test_the_store_writes_labels_the_codec_reads(redis_url, redis_client):
    # The submitted label is built in Python, the finished one inside the store's Lua script.
    settings = Settings(redis_url=redis_url, key_prefix=f"test-codecs-{uuid.uuid4().hex[:8]}")
    try:
        with Client(settings) as client:
            job = client.submit({"model": "z-image-turbo", "prompt": "a fox"}, priority="low")
            assert client.get(job.id).queue == "gpu16.low"
            assert client.cancel(job.id).status is JobStatus.CANCELED

            def labels(name: str) -> set[tuple[str, ...]]:
                return {parse_label(k.decode()) for k in redis_client.hgetall(client.keys.metrics(name))}

            assert labels("submitted") == {("z-image-turbo", "gpu16")}
            assert labels("finished") == {("z-image-turbo", "gpu16", "canceled")}
    finally:
        for key in redis_client.scan_iter(f"{settings.key_prefix}:*"):
            redis_client.delete(key)
        redis_client.delete("gpu16.low")


def test_the_envelope_reads_back_what_was_built():
    messages = TaskMessages(make_celery(Settings()))
    job_id = "ab" * 16
    queue, payload = messages.run_job(job_id, "gpu16.high")
    assert queue == "gpu16.high"
    assert task_id(payload) == task_id(payload.encode()) == task_id(json.loads(payload)) == job_id
    assert task_args(payload) == [job_id]

    _, webhook = messages.deliver_webhook(job_id, "event-1", "job.succeeded", "2025-01-01T00:00:00Z", "d-1")
    assert task_id(webhook) == "d-1"
    assert task_args(webhook) == [job_id, "event-1", "job.succeeded", "2025-01-01T00:00:00Z"]


def _with(payload: str, **changes: object) -> str:
    envelope = json.loads(payload)
    envelope.update(changes)
    return json.dumps(envelope)


def test_anything_else_is_refused():
    _, payload = TaskMessages(make_celery(Settings())).run_job("ab" * 16, "gpu16")
    headers = json.loads(payload)["headers"]
    not_messages = [
        "",
        "not json",
        "[]",
        '{"body": ""}',
        _with(payload, headers=[]),
        _with(payload, headers={**headers, "id": None}),
        _with(payload, headers={**headers, "id": ""}),
    ]
    for text in not_messages:
        with pytest.raises(ValueError):
            task_id(text)
    bad_bodies = [
        *not_messages[:5],
        _with(payload, body="not base64!"),
        _with(payload, body=base64.b64encode(b"not json").decode()),
        _with(payload, body=base64.b64encode(b'{"args": []}').decode()),
        _with(payload, body=base64.b64encode(b'["x", {}, {}]').decode()),
    ]
    for text in bad_bodies:
        with pytest.raises(ValueError):
            task_args(text)

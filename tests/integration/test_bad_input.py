"""Bad input is refused with an error naming the field, before anything is queued."""

from __future__ import annotations

import pytest

from producer.client import Client
from routing.errors import InvalidRequest

pytestmark = pytest.mark.integration

GOOD = {"model": "z-image-turbo", "prompt": "a red fox", "width": 512, "height": 512, "steps": 8}


def _queue_lengths(redis_client) -> dict[bytes, int]:
    queues = [k for k in redis_client.keys("gpu*") + redis_client.keys("h100x8*")]
    return {k: redis_client.llen(k) for k in queues}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"model": "dall-e-9"}, "model", "unknown model 'dall-e-9'"),
        ({"kind": "edit"}, "kind", "z-image-turbo does not do edit"),
        ({"kind": "paint"}, "kind", "unknown task kind"),
        ({"width": 500}, "width", "multiple of 16"),
        ({"height": 8192}, "height", "between 64 and 2048"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"steps": 500}, "steps", "at most 50"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "   "}, "prompt", "at least 1 character"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"width": "wide"}, "width", "valid integer"),
        ({"model": "wan2.2-s2v-14b"}, "audio", "required"),
        (
            {"model": "wan2.2-s2v-14b", "image": {"key": "uploads/a.png"}, "audio": {"key": "uploads/a.wav"}},
            "width",
            "makes only these sizes (width*height): 1024*704",
        ),
    ],
)
def test_bad_input_names_the_field_and_queues_nothing(client: Client, redis_client, change, field, words):
    before = _queue_lengths(redis_client)
    records_before = len(redis_client.keys(f"{client.keys.prefix}:job:*"))

    with pytest.raises(InvalidRequest) as raised:
        client.submit(GOOD | change)

    assert field in raised.value.fields
    assert words in str(raised.value)
    assert _queue_lengths(redis_client) == before
    assert len(redis_client.keys(f"{client.keys.prefix}:job:*")) == records_before


def test_missing_prompt_is_named(client: Client):
    with pytest.raises(InvalidRequest) as raised:
        client.submit({"model": "z-image-turbo"})
    assert raised.value.fields == ["prompt"]


def test_a_good_request_is_queued(client: Client, redis_client):
    """The same check that sees nothing queued above sees this one."""
    before = redis_client.llen("gpu16")
    job = client.submit(GOOD)
    assert redis_client.llen("gpu16") == before + 1
    client.cancel(job.id)

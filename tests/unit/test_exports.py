"""The SDK's exported surface, and the one webhook and output type the SDK, API and store share."""

from __future__ import annotations

import producer
from producer.api import create_app
from routing.jobs.events import WEBHOOK_EVENTS, EventType, Webhook, event_type
from routing.jobs.record import Output
from routing.settings import Settings


def test_every_name_in_all_exists_and_the_callers_needs_are_there():
    missing = [name for name in producer.__all__ if not hasattr(producer, name)]
    assert missing == []
    assert {"Client", "Job", "TooManyJobs", "Webhook", "Output", "InvalidRequest"} <= set(producer.__all__)
    assert producer.Webhook is Webhook and producer.Output is Output


def test_each_webhook_event_names_one_event_type_and_queued_is_not_one():
    assert [event_type(e) for e in WEBHOOK_EVENTS] == [
        EventType.STARTED,
        EventType.PROGRESS,
        EventType.SUCCEEDED,
        EventType.FAILED,
        EventType.CANCELED,
    ]
    assert set(EventType) - {event_type(e) for e in WEBHOOK_EVENTS} == {EventType.QUEUED}


def test_the_api_documents_the_shared_webhook_and_output_types():
    # No request is made: the app is built only for its OpenAPI document.
    schemas = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()["components"]["schemas"]
    webhook = schemas["Webhook"]
    assert set(webhook["properties"]) == {"url", "events"} and webhook["required"] == ["url"]
    assert webhook["properties"]["events"]["items"]["enum"] == list(WEBHOOK_EVENTS)
    assert webhook["additionalProperties"] is False
    output = schemas["Output"]["properties"]
    assert set(output) == {
        "key",
        "url",
        "content_type",
        "size_bytes",
        "width",
        "height",
        "seed",
        "frames",
        "fps",
        "cache",
    }


def test_an_output_with_a_url_keeps_everything_else():
    stored = Output("jobs/j/output-0.mp4", "video/mp4", 1234, 832, 480, seed=7, frames=81, fps=16)
    handed_out = stored.with_url("https://store.example/jobs/j/output-0.mp4?sig=x")
    assert (handed_out.seed, handed_out.frames, handed_out.fps, handed_out.size_bytes) == (7, 81, 16, 1234)
    assert stored.url is None and handed_out.url.startswith("https://")

"""A job's events, and the webhook that asks for some of them.

An event's type is ``job.<name>``; a webhook names the events it wants by their short name
(``started``, ``succeeded``, ...). ``Webhook`` is the one webhook type: the SDK takes it, the HTTP
API's ``webhook`` object is its schema, and the job record keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import ConfigDict, Field

from routing.errors import FieldError, InvalidRequest
from routing.io.net import UrlError, UrlPolicy, check_url


class EventType(StrEnum):
    QUEUED = "job.queued"
    STARTED = "job.started"
    PROGRESS = "job.progress"
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELED = "job.canceled"


# Events a webhook can ask for (every event but queued, which happens before the submit returns).
WebhookEvent = Literal["started", "progress", "succeeded", "failed", "canceled"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)


def event_type(event: WebhookEvent) -> EventType:
    """The type of the event a webhook names by ``event``: ``"started"`` is ``job.started``."""
    return EventType(f"job.{event}")


@dataclass(frozen=True)
class Webhook:
    """Where a job's events are POSTed, and which of them (default: all)."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=1)]  # at most FLEET_MAX_URL_CHARS: check_webhook
    events: Annotated[tuple[WebhookEvent, ...], Field(min_length=1)] = WEBHOOK_EVENTS


def check_webhook(webhook: Webhook, policy: UrlPolicy) -> None:
    """Refuse a webhook whose URL (its address, its length: ``policy.max_chars``) or events are
    not acceptable, naming the field. (The HTTP API's schema refuses unknown events already; an
    SDK caller's reach here.)"""
    errors = []
    unknown = [e for e in webhook.events if e not in WEBHOOK_EVENTS]
    if unknown or not webhook.events:
        errors.append(
            FieldError("webhook.events", f"each one of {', '.join(WEBHOOK_EVENTS)} (got {unknown or 'none'})")
        )
    try:
        check_url(webhook.url, policy)
    except UrlError as exc:
        errors.append(FieldError("webhook.url", str(exc)))
    if errors:
        raise InvalidRequest(errors)

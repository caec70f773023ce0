"""Tenants, and an API process, for the tests that call the HTTP API as a tenant: tenant ``<name>``
has the one key ``key-<name>``."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from localfleet.process import ApiProcess
from routing.settings import Settings

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
# A job the small Z-Image-Turbo runs in a second or two.
SMALL = {
    "model": "z-image-turbo",
    "kind": "text-to-image",
    "prompt": "a fox",
    "width": 64,
    "height": 64,
    "steps": 2,
}


def webhook_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def tenants(*names: str, **extra: Any) -> dict[str, dict[str, Any]]:
    """``FLEET_TENANTS`` of ``names``, each with its key, a webhook secret and ``extra``."""
    return {
        name: {"api_keys": [f"key-{name}"], "webhook_secret": webhook_secret(), **extra} for name in names
    }


def with_tenants(settings: Settings, *names: str, **update: Any) -> Settings:
    """``settings`` with the tenants ``names`` and the other fields of ``update``."""
    return Settings.model_validate(settings.model_dump() | {"tenants": tenants(*names)} | update)


@contextlib.contextmanager
def api_client(settings: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    """A uvicorn API process on ``settings``, and an HTTP client of it."""
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as process:
        with httpx.Client(base_url=process.url, timeout=60, trust_env=False) as http:
            yield http

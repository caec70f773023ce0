"""The OpenAPI document saved for the TypeScript client is the one the API serves: a client built
offline (``npm ci && npm run build``) has every field the API takes and returns."""

from __future__ import annotations

import json

from producer.api import openapi_document
from tests.conftest import ROOT


def test_the_saved_document_is_the_apis():
    saved = json.loads((ROOT / "clients" / "typescript" / "openapi.json").read_text())
    assert saved == openapi_document(), "the API changed: run `make openapi` and commit the document"

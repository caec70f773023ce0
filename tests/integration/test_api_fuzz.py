"""Schemathesis against the HTTP API (producer/api.py): generated requests, valid and invalid,
to every operation of its OpenAPI document, on real Redis, as a tenant with a bearer key.

What must hold for every request:

- no 5xx (``not_a_server_error``);
- the response matches what the document says: JSON of the documented schema
  (``response_schema_conformance``, ``content_type_conformance``, ``response_headers_conformance``),
  invalid data refused with a 4xx (``negative_data_rejection``), requests without the key or with
  a wrong one refused (``ignored_auth``), other methods answered 405 (``unsupported_method``);
- the OpenAI-compatible calls (POST /v1/images/...) queue one job when they answer 408 (no worker:
  the job outlasts the 0.2 s wait) and none when they refuse; POST /v1/videos queues one when it
  answers 200 and none when it refuses;
- POST /v1/jobs queues exactly what it says: a refusal (status >= 400) leaves the queue lists
  (gpu16*, gpu80*, h100x8*) as they were, a 201 adds one message, an idempotent 200 adds none,
  and a 202 (``Prefer: wait=N``, the job not ended in time) adds one for a new job and none for
  an earlier one. The fuzzer seldom writes a valid ``Prefer`` header, so
  ``test_prefer_wait_answers_202_and_queues_like_any_submit`` sends the 202 cases through the
  same check.

No worker runs: accepted jobs stay queued (the queues are emptied before and after).

The document is taken as the app serves it (bearer auth, the 422 error list, every error status
and the upload body are documented there; ``test_openapi_document_says_what_the_api_does`` keeps
it so), with one change made here for the fuzzing only: ``model`` is narrowed to the catalog's
models for the body's ``kind``, so generated jobs get past "unknown model" into routing and
queueing instead of stopping there nearly every time.

Checks left out, and why:

- ``negative_data_rejection`` for a multipart case whose every mutation went out valid
  (``_went_out_valid``): a form sends an empty array as no part, and an object, a number or a
  boolean as its JSON text, which a string field rightly accepts (``user={"": null}`` is a
  10-character user). Every other negative case is checked.

- ``positive_data_acceptance``: the schema cannot say what ``parse_request`` checks (sizes that
  are multiples of 16, steps within the model's maximum, a served model, media that decodes), so
  most schema-valid bodies are rightly refused with 422.
- ``allow_header_conformance``: Starlette answers an unsupported method with the ``Allow`` of
  one route only (``OPTIONS /v1/jobs`` gets ``Allow: POST``, not ``GET, POST``), since FastAPI
  makes a route per method and path; a framework trait, not the fleet's.

The requests counted (at least 1,000, and every operation fuzzed: checked by
``test_fuzzing_sent_at_least_1000_requests``, which fails otherwise) are the generated cases the
test sends; the checks' own extra requests (``ignored_auth``, ...) come on top. Run the file
whole: the count is of the fuzz items that ran before it.

Network: webhook URL host names resolve through a stub (a public address, no DNS) and input
media URLs are not fetched (a stub returns a small PNG): the fuzzer must not reach the internet.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema
import pytest
import redis as redis_lib
import schemathesis
from PIL import Image
from schemathesis.specs.openapi.checks import negative_data_rejection

import producer.inputs
from producer.api import create_app
from routing.catalog import CATALOG
from routing.io.net import UrlPolicy
from routing.settings import Settings

pytestmark = pytest.mark.integration

API_KEY = "key-1"
QUEUE_PATTERNS = ("gpu16*", "gpu80*", "h100x8*")
# Fuzzing-phase examples per operation (FLEET_FUZZ_EXAMPLES to hunt longer). Twenty-four operations
# take input (/healthz stops after a case or two): about 250 requests each, POST /v1/jobs about
# 1,300 with the coverage phase's cases, and one request per unsupported method. About 7,000
# requests in about 175 s of one process on two cores (test_api_fuzz.py alone, -n0, -s prints
# the count).
MAX_EXAMPLES = int(os.environ.get("FLEET_FUZZ_EXAMPLES", "250"))
MIN_REQUESTS = 1000
REQUEST_TIMEOUT_S = 120  # a hang guard for one request (see the test)


@dataclass
class FuzzLog:
    """What the fuzzing sent: counted here, checked when the test ends."""

    requests: int = 0
    by_operation: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    jobs: set[str] = field(default_factory=set)  # ids POST /v1/jobs answered with


def check_submit_queued(status: int, body: Any, added: int, earlier_jobs: set[str]) -> None:
    """POST /v1/jobs queued exactly what its answer says (``added`` messages); ``earlier_jobs``:
    the ids answered before, to which this answer's id is added."""
    if status >= 400:
        assert added == 0, f"{status} to POST /v1/jobs, yet {added} message(s) queued"
        return
    job_id = body["id"]
    new = job_id not in earlier_jobs
    earlier_jobs.add(job_id)
    if status == 201:
        assert added == 1, f"201 to POST /v1/jobs, {added} messages queued"
    elif status == 200:
        assert added == 0, f"200 (the earlier job) to POST /v1/jobs, yet {added} message(s) queued"
    elif status == 202:
        # With Prefer: wait, a job not ended in time: a new one (queued once) or an earlier one.
        assert added == int(new), f"202 to POST /v1/jobs ({'new' if new else 'earlier'} job), {added} queued"
    else:
        raise AssertionError(f"{status} to POST /v1/jobs: an answer the document does not list")


def check_openai_queued(status: int, added: int) -> None:
    """An OpenAI-compatible call queued exactly what its answer says: with no worker, a job it
    accepted is still running when the wait ends (408, one message); anything else queued none."""
    if status == 408:
        assert added == 1, f"408 to an OpenAI call, {added} messages queued"
    else:
        assert status >= 400, f"{status} to an OpenAI call while no worker runs"
        assert added == 0, f"{status} to an OpenAI call, yet {added} message(s) queued"


def _clear_queues(client: redis_lib.Redis) -> None:
    for pattern in (*QUEUE_PATTERNS, "webhooks*"):
        for key in client.scan_iter(pattern):
            client.delete(key)


def _queued(client: redis_lib.Redis) -> int:
    """Messages in every GPU queue list."""
    keys = [k for pattern in QUEUE_PATTERNS for k in client.scan_iter(pattern)]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
        types = pipe.execute()
        lists = [k for k, t in zip(keys, types, strict=True) if t == b"list"]
        for key in lists:
            pipe.llen(key)
        return sum(pipe.execute())


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _settings(redis_url: str, storage_dir: Path) -> Settings:
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    return Settings(
        redis_url=redis_url,
        key_prefix=f"fuzz-{uuid.uuid4().hex[:8]}",
        storage_backend="local",
        storage_dir=storage_dir,
        tenants={"t1": {"api_keys": [API_KEY], "webhook_secret": secret, "max_in_flight": 100_000}},
        openai_wait_s=0.2,  # no worker runs: an accepted OpenAI call waits this long, then 408
    )


def documented(spec: dict[str, Any]) -> dict[str, Any]:
    """The app's OpenAPI document with ``model`` narrowed to the catalog's models of each kind,
    so generated jobs get past the catalog into routing and queueing."""
    spec = copy.deepcopy(spec)
    for name, schema in spec["components"]["schemas"].items():
        if name.endswith("Submission"):
            kind = schema["properties"]["kind"]["const"]
            models = sorted(key for key, entry in CATALOG.items() if kind in entry.task_kinds)
            schema["properties"]["model"] = {"type": "string", "enum": models, "title": "Model"}
    return spec


class _CurrentApp:
    """The ASGI app the generated requests go to: the schema is loaded when pytest imports this
    module, before any fixture exists, so it talks to this, and ``fuzz_app`` points it at the
    app built on the test's Redis. (``schemathesis.pytest.from_fixture`` would avoid this, but
    Schemathesis 4.32 sets ``Function._nodeid`` there, which pytest 9.2 no longer has.)"""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def _documented_app(settings: Settings) -> Any:
    app = create_app(settings)
    app.openapi_schema = documented(app.openapi())  # what /openapi.json serves
    return app


# Building the app contacts no Redis: this one only serves the document while pytest collects.
CURRENT_APP = _CurrentApp(_documented_app(_settings("redis://127.0.0.1:1/0", Path("var/unused"))))
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all"},
        "auth": {"openapi": {"HTTPBearer": {"bearer": API_KEY}}},
        "checks": {
            "positive_data_acceptance": {"enabled": False},
            "allow_header_conformance": {"enabled": False},
        },
    }
)
schema = schemathesis.openapi.from_asgi("/openapi.json", CURRENT_APP, config=CONFIG)
OPERATIONS = {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}


@pytest.fixture(scope="module")
def queues(redis_url: str) -> Iterator[redis_lib.Redis]:
    """Redis, with the queues emptied before and after the fuzzing."""
    client = redis_lib.Redis.from_url(redis_url)
    _clear_queues(client)
    yield client
    _clear_queues(client)
    client.close()


@pytest.fixture(scope="module")
def fuzz_app(
    redis_url: str, queues: redis_lib.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    settings = _settings(redis_url, tmp_path_factory.mktemp("fuzz") / "objects")
    app = _documented_app(settings)
    # No DNS and no downloads (see the module docstring); the address rules still apply to
    # literal addresses.
    app.state.client.url_policy = UrlPolicy(resolver=lambda _host, _port: ["93.184.215.14"])
    png = _png()
    previous = CURRENT_APP.app
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(producer.inputs, "fetch_into", lambda _url, out, **_kwargs: out.write(png))
        CURRENT_APP.app = app
        try:
            yield app
        finally:
            CURRENT_APP.app = previous
            for key in queues.scan_iter(f"{settings.key_prefix}*"):
                queues.delete(key)


@pytest.fixture(scope="module")
def fuzz_log() -> FuzzLog:
    return FuzzLog()


# A hang guard, not a bound: one operation's cases took up to 406 s with two suites running.
@pytest.mark.timeout(900)
@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
def test_api_survives_fuzzing_and_queues_nothing_it_refuses(
    case: schemathesis.Case, fuzz_app: Any, queues: redis_lib.Redis, fuzz_log: FuzzLog
) -> None:
    submits = (case.method.upper(), case.path) == ("POST", "/v1/jobs")
    openai_call = case.path.startswith("/v1/images/")
    video_call = (case.method.upper(), case.path) == ("POST", "/v1/videos")
    before = _queued(queues) if submits or openai_call or video_call else 0

    # The answer is checked, not how soon it came: with two suites running, an upload of four
    # bytes waited past schemathesis's 10 s for its turn at the CPU. An event stream keeps that
    # default, where it is cut (no error: the job stays queued, so its stream would not end).
    response = case.call() if case.path.endswith("/events") else case.call(timeout=REQUEST_TIMEOUT_S)

    fuzz_log.requests += 1
    fuzz_log.by_operation[f"{case.method.upper()} {case.path}"] += 1
    fuzz_log.by_status[response.status_code] += 1
    if submits:
        body = response.json() if response.status_code < 400 else None
        check_submit_queued(response.status_code, body, _queued(queues) - before, fuzz_log.jobs)
    if openai_call:
        check_openai_queued(response.status_code, _queued(queues) - before)
    if video_call:  # answered at once: a video accepted is one message, a refusal none
        added = _queued(queues) - before
        assert added == int(response.status_code == 200), (
            f"{response.status_code} to POST /v1/videos, {added} queued"
        )
    # A form sends an empty array as no part, and any other value as text: such a "negative"
    # case may have gone out valid.
    excluded = [negative_data_rejection] if _went_out_valid(case) else None
    case.validate_response(response, excluded_checks=excluded)


def _went_out_valid(case: schemathesis.Case) -> bool:
    """A negative multipart case whose every mutation went out valid, as a form carries it: a
    field made an empty array is sent as no part, and one made an object, a number or a boolean
    is sent as its JSON text, which the field's schema may accept as a string (Schemathesis judges
    the value, not the text sent). Any other negative case is checked as it is."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_negative or not isinstance(case.body, dict):
        return False
    if not (case.media_type or "").startswith("multipart/form-data"):
        return False
    mutations = getattr(meta.phase.data, "mutations", None) or []
    fields = [
        m.schema_pointer.split("/")[2] for m in mutations if m.schema_pointer.startswith("/properties/")
    ]
    if not mutations or len(fields) != len(mutations):
        return False
    [form] = [body for body in case.operation.body if body.media_type == case.media_type]
    properties = form.resolved_schema.get("properties", {})
    return all(_sent_valid(case.body.get(name), properties.get(name, {})) for name in fields)


def _sent_valid(value: Any, schema: dict[str, Any]) -> bool:
    if value == []:
        return True  # no part
    if isinstance(value, dict | int | float | bool) and value is not None:
        return jsonschema.validators.validator_for(schema)(schema).is_valid(json.dumps(value))
    return False


def test_prefer_wait_answers_202_and_queues_like_any_submit(
    fuzz_app: Any, queues: redis_lib.Redis, fuzz_log: FuzzLog
) -> None:
    """The documented 202 through the fuzz test's own check (catches: a wait that queues nothing
    or twice, a replay with Prefer: wait that queues again, a 202 body off its schema)."""
    operation = schema["/v1/jobs"]["POST"]
    job = {"model": "z-image-turbo", "kind": "text-to-image", "prompt": "a fox", "width": 64, "height": 64}
    headers = {"Authorization": f"Bearer {API_KEY}", "Prefer": "wait=1", "Idempotency-Key": uuid.uuid4().hex}
    answers = []
    for _ in ("new", "replay"):  # no worker runs: the job is still queued after the wait
        case = operation.Case(body=job, headers=headers, media_type="application/json")
        before = _queued(queues)
        response = case.call()
        assert response.status_code == 202, response.text
        check_submit_queued(202, response.json(), _queued(queues) - before, fuzz_log.jobs)
        case.validate_response(response)
        answers.append(response.json()["id"])
    assert answers[0] == answers[1]


def test_fuzzing_sent_at_least_1000_requests(fuzz_log: FuzzLog) -> None:
    """Runs after the fuzz items above (pytest keeps file order)."""
    elapsed = time.monotonic() - fuzz_log.started
    summary = (
        f"{fuzz_log.requests} requests in {elapsed:.1f} s; by operation {dict(fuzz_log.by_operation)}; "
        f"by status {dict(sorted(fuzz_log.by_status.items()))}"
    )
    print(f"\nfuzz: {summary}")
    missing = OPERATIONS - set(fuzz_log.by_operation)
    assert not missing, f"operations not fuzzed (run the file whole): {sorted(missing)}; {summary}"
    assert fuzz_log.requests >= MIN_REQUESTS, summary


def _app_document() -> dict[str, Any]:
    return create_app(_settings("redis://127.0.0.1:1/0", Path("var/unused"))).openapi()


def _bearer_scheme(spec: dict[str, Any]) -> bool:
    schemes = spec.get("components", {}).get("securitySchemes", {}).values()
    return any(s.get("scheme", "").lower() == "bearer" for s in schemes)


def _documents_422_errors(spec: dict[str, Any]) -> bool:
    schema = spec["paths"]["/v1/jobs"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    name = schema["$ref"].rsplit("/", 1)[-1]
    return "errors" in spec["components"]["schemas"][name]["properties"]


def _documents_http_errors(spec: dict[str, Any]) -> bool:
    get, post = spec["paths"]["/v1/jobs/{job_id}"]["get"], spec["paths"]["/v1/jobs"]["post"]
    return {"401", "404"} <= set(get["responses"]) and {"401", "409", "429"} <= set(post["responses"])


def _documents_upload_body(spec: dict[str, Any]) -> bool:
    return "requestBody" in spec["paths"]["/v1/uploads"]["post"]


def _kind_required(spec: dict[str, Any]) -> bool:
    schemas = spec["components"]["schemas"]
    return all("kind" in s.get("required", []) for n, s in schemas.items() if n.endswith("Submission"))


def _media_ref_exactly_one(spec: dict[str, Any]) -> bool:
    ref = spec["components"]["schemas"]["MediaRef"]
    return "oneOf" in ref or "required" in ref


# What the app's OpenAPI document must say for clients (and the fuzzing) to use it as it is.
@pytest.mark.parametrize(
    "documents",
    [
        _bearer_scheme,
        _documents_422_errors,
        _documents_http_errors,
        _documents_upload_body,
        _kind_required,
        _media_ref_exactly_one,
    ],
    ids=lambda check: check.__name__.lstrip("_"),
)
def test_openapi_document_says_what_the_api_does(documents: Any) -> None:
    assert documents(_app_document())

"""The HTTP SDK's core without I/O: a flow says which request to send, and reads the answer it is
given. The real API behind both shells is in tests/integration/test_http_sdk.py."""

from __future__ import annotations

import json

import httpx
import pytest

from producer.protocol import Core, NextLine, Open, Send, Sleep, SseDecoder
from routing.errors import InvalidRequest, TooManyJobs
from routing.jobs.record import JobStatus


def job(status: str = "queued", step: int = 0) -> dict:
    return {
        "id": "j1",
        "model": "z-image-turbo",
        "kind": "text-to-image",
        "request": {},
        "status": status,
        "queue": "gpu16",
        "attempt": 1,
        "progress": {"step": step, "total": 2},
        "created_at": 1.0,
        "updated_at": 1.0,
        "started_at": None,
        "finished_at": None,
        "error": None,
        "timings": {},
        "priority": "normal",
    }


def answer(request: httpx.Request, status: int, body: object, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers, request=request)


def test_a_submit_is_built_with_its_key_kind_and_options_and_retried_after_retry_after():
    core = Core("http://fleet.test/", "key-a", max_retries=1)
    flow = core.submit({"model": "z-image-turbo", "prompt": "a fox"}, "order-1", priority="high", wait_s=5)
    send = next(flow)
    assert isinstance(send, Send)
    request = send.request
    assert (request.method, str(request.url)) == ("POST", "http://fleet.test/v1/jobs")
    assert request.headers["Authorization"] == "Bearer key-a"
    assert (request.headers["Idempotency-Key"], request.headers["Prefer"]) == ("order-1", "wait=5")
    assert json.loads(request.content) == {
        "model": "z-image-turbo",
        "prompt": "a fox",
        "kind": "text-to-image",  # the model's only kind
        "priority": "high",
    }
    assert request.extensions["timeout"]["read"] == 35.0  # the call's timeout and the wait
    assert flow.send(answer(request, 429, {"detail": "busy"}, **{"Retry-After": "3"})) == Sleep(3.0)
    assert next(flow) == send  # the same request again, idempotency key and all
    with pytest.raises(StopIteration) as done:
        flow.send(answer(request, 201, job()))
    assert done.value.value.status is JobStatus.QUEUED and done.value.value.created


def test_errors_come_from_the_status_and_body_and_the_last_retry_raises():
    core = Core("http://fleet.test", "key-a", max_retries=0)
    flow = core.submit({"model": "z-image-turbo", "kind": "text-to-image", "prompt": "x"})
    request = next(flow).request
    with pytest.raises(InvalidRequest) as refused:
        flow.send(answer(request, 422, {"errors": [{"field": "width", "message": "too wide"}]}))
    assert refused.value.fields == ["width"]
    flow = core.get("j1")
    request = next(flow).request
    with pytest.raises(TooManyJobs):
        flow.send(answer(request, 429, {"detail": "at the limit"}))


def test_a_retry_after_longer_than_the_sdk_waits_is_raised_at_once():
    core = Core("http://fleet.test", "key-a", max_retries=3, max_retry_wait_s=60)
    flow = core.get("j1")
    request = next(flow).request
    assert flow.send(answer(request, 503, {"detail": "busy"}, **{"Retry-After": "60"})) == Sleep(60.0)
    assert next(flow) == Send(request)
    with pytest.raises(TooManyJobs):  # a sooner retry would be refused again
        flow.send(answer(request, 429, {"detail": "too many"}, **{"Retry-After": "61"}))


def test_wait_reads_progress_from_the_stream_and_reconnects_from_the_last_event():
    core = Core("http://fleet.test", "key-a")
    seen = []
    flow = core.wait("j1", on_progress=lambda r: seen.append((r.status.value, r.step)))
    get = next(flow)
    opened = flow.send(answer(get.request, 200, job()))
    assert isinstance(opened, Open) and "Last-Event-ID" not in opened.request.headers
    assert flow.send(httpx.Response(200, request=opened.request)) == NextLine()
    for line in ("id: 5-0", "event: progress", 'data: {"step": 1, "total": 2}', ""):
        effect = flow.send(line)
    assert effect == NextLine() and seen[-1] == ("running", 1)
    flow.send(httpx.ReadError("dropped"))  # the stream drops: closed, then the record read again
    get = next(flow)
    reopened = flow.send(answer(get.request, 200, job("running", 1)))
    assert reopened.request.headers["Last-Event-ID"] == "5-0"
    flow.send(httpx.Response(200, request=reopened.request))
    for line in ("id: 6-0", "event: succeeded", 'data: {"status": "succeeded"}'):
        effect = flow.send(line)
    flow.send("")  # the terminal event: the stream is closed and the record read
    get = next(flow)
    with pytest.raises(StopIteration) as done:
        flow.send(answer(get.request, 200, job("succeeded", 2)))
    assert done.value.value.status is JobStatus.SUCCEEDED


def test_the_sse_decoder_skips_keepalives_and_joins_data_lines():
    decoder = SseDecoder()
    assert [decoder.feed(x) for x in (": keepalive", "")] == [None, None]
    for line in ("id: 1-0", "event: progress", 'data: {"step":', 'data: 1, "total": 2}'):
        assert decoder.feed(line) is None
    event = decoder.feed("")
    assert (event.id, event.name, event.data) == ("1-0", "progress", {"step": 1, "total": 2})

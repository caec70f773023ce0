"""Traces through a real uvicorn API process and a real GPU worker process, exported over OTLP/HTTP
to a receiver on loopback that takes what an OpenTelemetry Collector's OTLP/HTTP receiver takes
(``POST /v1/traces``, a protobuf ``ExportTraceServiceRequest``): one trace per job, from the
caller's span through the API's submit to the worker's attempt and its phases."""

from __future__ import annotations

import gzip
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from routing.settings import Settings
from tests.api_tenants import SMALL, A, api_client, with_tenants

pytestmark = pytest.mark.integration

PHASES = {"inputs", "checkout", "prepare", "generate"}


class OtlpReceiver:
    """Keeps every span it is sent, with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    for resource in request.resource_spans:
                        attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
                        for scope in resource.scope_spans:
                            receiver.spans += [(attributes["service.name"], span) for span in scope.spans]
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def named(self, service: str, name: str) -> list[object]:
        with self.lock:
            return [span for who, span in self.spans if (who, span.name) == (service, name)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver()
    yield found
    found.close()


def _attributes(span: object) -> dict[str, object]:
    return {a.key: a.value.string_value or a.value.int_value for a in span.attributes}


def _wait_job(api: httpx.Client, job_id: str) -> None:
    deadline = time.monotonic() + 180
    while api.get(f"/v1/jobs/{job_id}", headers=A).json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_jobs_trace_runs_from_the_callers_span_to_the_workers_store(
    receiver: OtlpReceiver, fleet_settings: Settings, start_worker, tmp_path: Path
):
    settings = with_tenants(fleet_settings, "a", otlp_endpoint=receiver.url)
    start_worker(settings, OTEL_BSP_SCHEDULE_DELAY="100")
    caller_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with api_client(settings, tmp_path) as api:
        traced = api.post(
            "/v1/jobs", json=SMALL, headers=A | {"traceparent": f"00-{caller_trace}-{caller_span}-01"}
        )
        untraced = api.post("/v1/jobs", json=SMALL | {"prompt": "a hare"}, headers=A)
        for answer in (traced, untraced):
            assert answer.status_code == 201, answer.text
            _wait_job(api, answer.json()["id"])
        deadline = time.monotonic() + 30
        while len(receiver.named("fleet-worker", "store")) < 2:
            assert time.monotonic() < deadline, [(who, span.name) for who, span in receiver.spans]
            time.sleep(0.1)
    # The API's spans go as it stops, at the latest.
    submits = receiver.named("fleet-api", "POST /v1/jobs")
    assert len(submits) == 2

    for answer in (traced, untraced):
        job_id = answer.json()["id"]
        [run] = [s for s in receiver.named("fleet-worker", "job") if _attributes(s)["job_id"] == job_id]
        [submit] = [s for s in submits if s.trace_id == run.trace_id]
        # The attempt is a child of the submit; every phase, and the store, a child of the attempt.
        assert run.parent_span_id == submit.span_id
        assert _attributes(run) | {"worker": ""} == {
            "job_id": job_id,
            "model": "z-image-turbo",
            "attempt": 1,
            "worker": "",
        }
        children = {s.name for who, s in receiver.spans if s.parent_span_id == run.span_id}
        assert children == PHASES | {"store"}
        assert _attributes(submit)["tenant"] == "a"
    # A request with a traceparent joins the caller's trace; one without starts its own.
    [with_caller] = [s for s in submits if s.trace_id.hex() == caller_trace]
    assert with_caller.parent_span_id.hex() == caller_span
    [own] = [s for s in submits if s.trace_id.hex() != caller_trace]
    assert own.parent_span_id == b""

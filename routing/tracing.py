"""Traces (OpenTelemetry): one trace per job, from the caller's request to the worker's store,
exported over OTLP/HTTP to ``FLEET_OTLP_ENDPOINT`` (an OpenTelemetry Collector, Jaeger, Tempo...).
Unset, nothing is traced and OpenTelemetry is not even imported.

The API's span of a submit (``fleet-api``; a child of the caller's span when the request carries a
W3C ``traceparent`` header) is kept on each job's record as its ``traceparent``, and the worker
(``fleet-worker``) opens the span of each attempt under it: ``job`` (the job's id, model, attempt,
worker), with a span per phase: ``inputs``, ``checkout`` (a model load when cold), ``prepare``,
``generate`` and ``store``. The Redis SDK's producers are traced the same way once they call
``setup``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_provider: Any = None


def setup(service: str, endpoint: str | None) -> bool:
    """Export this process's spans as ``service`` to ``endpoint`` (its base URL; spans go to
    ``<endpoint>/v1/traces``). Returns whether tracing is on. Call it in the process that makes
    the spans (a worker's pool child, after the fork)."""
    global _provider
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    return True


def shutdown() -> None:
    """Export what is left, and stop."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


@contextlib.contextmanager
def span(name: str, parent: str | None = None, **attributes: Any) -> Iterator[None]:
    """A span around the block: a child of the current span, or of ``parent`` (a W3C
    traceparent) when given. Nothing when tracing is off."""
    if _provider is None:
        yield
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": parent}) if parent else None
    kept = {key: value for key, value in attributes.items() if value is not None}
    with _provider.get_tracer("gpu-fleet").start_as_current_span(name, context=context, attributes=kept):
        yield


def traceparent() -> str | None:
    """The W3C traceparent of the current span, or None (no span, or tracing off)."""
    if _provider is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")

"""JSON logs: one object per line, with the current trace and span ids."""

from __future__ import annotations

import logging

import orjson
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.common.logs import JsonFormatter


def test_log_lines_are_json_with_trace_ids():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    record.fields = {"model": "m"}
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        line = JsonFormatter("gateway").format(record)
    entry = orjson.loads(line)
    ctx = span.get_span_context()
    assert entry["msg"] == "hello world" and entry["level"] == "warning" and entry["service"] == "gateway"
    assert entry["trace_id"] == f"{ctx.trace_id:032x}" and entry["span_id"] == f"{ctx.span_id:016x}"
    assert entry["model"] == "m"


def test_log_lines_without_a_span_have_no_trace_ids():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain", (), None)
    with trace.use_span(trace.INVALID_SPAN):
        entry = orjson.loads(JsonFormatter("preprocess").format(record))
    assert "trace_id" not in entry and entry["msg"] == "plain"

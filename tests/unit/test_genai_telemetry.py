"""OpenTelemetry's GenAI conventions on the gateway: what Metering records when a generation or
embeddings request finishes (the `gen_ai_*` Prometheus series and the span's `gen_ai.*`
attributes), and that other tasks record none. The end-to-end check through a traced mesh is in
tests/e2e/test_tracing.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from services.common.catalog import Catalog
from services.common.errors import ErrorCode, MeshError
from services.gateway.control import genai
from services.gateway.control.auth import Authenticator
from services.gateway.control.metering import Metering

CATALOG = Catalog.load(Path(__file__).parents[2] / "catalog.yaml")
CHAT = "/v1/chat/completions"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


async def admitted(model: str, task: str, route: str):
    metering = Metering.disabled()
    metered = await metering.admit(
        Authenticator.ANONYMOUS, CATALOG.get(model), task, route, "req-1", max_input_tokens=8
    )
    return metering, metered


async def test_a_streamed_chat_records_usage_ttft_and_tpot_under_the_conventions(spans):
    tracer, exporter = spans
    model = "meshserve/tiny-llama-chat"
    labels = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "meshserve", "gen_ai_request_model": model}
    before = {
        "in": value("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input"),
        "out": value("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="output"),
        "ttft": value("gen_ai_server_time_to_first_token_seconds_count", **labels),
        "tpot": value("gen_ai_server_time_per_output_token_seconds_count", **labels),
        "server": value("gen_ai_server_request_duration_seconds_count", **labels, error_type=""),
        "client": value("gen_ai_client_operation_duration_seconds_count", **labels, error_type=""),
    }
    with tracer.start_as_current_span("POST /v1/chat/completions"):
        metering, metered = await admitted(model, "text-generation", CHAT)
        metered.add(input_tokens=7)
        metered.delivered = True  # the first token reaches the client
        metered.add(output_tokens=5)
        await metering.finish(metered, 200)
        genai.annotate_response("chatcmpl-1", ["length"], model)
    assert value("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input") - before["in"] == 7
    assert value("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="output") - before["out"] == 5
    for name, metric in (
        ("ttft", "gen_ai_server_time_to_first_token_seconds_count"),
        ("tpot", "gen_ai_server_time_per_output_token_seconds_count"),
    ):
        assert value(metric, **labels) - before[name] == 1
    assert value("gen_ai_server_request_duration_seconds_count", **labels, error_type="") - before["server"] == 1
    assert value("gen_ai_client_operation_duration_seconds_count", **labels, error_type="") - before["client"] == 1
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "meshserve",
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": 7,
        "gen_ai.usage.output_tokens": 5,
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.response.model": model,
    }


async def test_embeddings_count_input_tokens_only_and_a_refusal_counts_as_an_error(spans):
    tracer, exporter = spans
    model = "sentence-transformers/all-MiniLM-L6-v2"
    labels = {"gen_ai_operation_name": "embeddings", "gen_ai_provider_name": "meshserve", "gen_ai_request_model": model}
    out_before = value("gen_ai_client_token_usage_count", **labels, gen_ai_token_type="output")
    refused_before = value("gen_ai_server_request_duration_seconds_count", **labels, error_type="429")
    with tracer.start_as_current_span("POST /v1/embeddings"):
        metering, metered = await admitted(model, "feature-extraction", "/v1/embeddings")
        metered.add(input_tokens=4, items=1)
        await metering.finish(metered, 200)
    (span,) = exporter.get_finished_spans()
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["gen_ai.usage.input_tokens"] == 4
    assert "gen_ai.usage.output_tokens" not in span.attributes
    assert value("gen_ai_client_token_usage_count", **labels, gen_ai_token_type="output") == out_before
    metering._record_refusal(
        Authenticator.ANONYMOUS, CATALOG.get(model), "feature-extraction", "/v1/embeddings", "req-2",
        MeshError(ErrorCode.RATE_LIMITED, "slow down"),
    )  # fmt: skip
    assert value("gen_ai_server_request_duration_seconds_count", **labels, error_type="429") - refused_before == 1


async def test_tasks_that_are_not_genai_operations_record_nothing(spans):
    tracer, exporter = spans
    model = "meshserve/sentiment-minilm"
    before = {(m.name, s.name): s.value for m in REGISTRY.collect() if m.name.startswith("gen_ai_") for s in m.samples}
    with tracer.start_as_current_span("POST /models"):
        metering, metered = await admitted(model, "text-classification", "/models")
        metered.add(input_tokens=3, items=1)
        await metering.finish(metered, 200)
    after = {(m.name, s.name): s.value for m in REGISTRY.collect() if m.name.startswith("gen_ai_") for s in m.samples}
    assert not [s for m in REGISTRY.collect() if m.name.startswith("gen_ai_") for s in m.samples
                if s.labels.get("gen_ai_request_model") == model]  # fmt: skip
    assert sum(after.values()) == sum(before.values())
    (span,) = exporter.get_finished_spans()
    assert not [k for k in span.attributes if k.startswith("gen_ai.")]

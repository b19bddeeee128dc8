"""One trace across the HTTP request and all four services, exported over OTLP/gRPC to a real
collector endpoint that the test runs."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.helpers import MODEL_ID, TRITON_SKIP_REASON, TRITON_SUPPORTED, free_port, serving_only, start_mesh

pytestmark = pytest.mark.xdist_group("tracing")

GEN_MODEL = "meshserve/tiny-llama-chat"


def otel_env(port: int) -> dict[str, str]:
    """Environment that makes every service export its spans to the in-test receiver quickly."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that keeps every span it is sent: (service, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((attrs.get("service.name", ""), span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def for_trace(self, trace_id: str) -> list[tuple[str, object]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def receiver():
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    collector = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield collector, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced_mesh(receiver, models_dir, tmp_path_factory):
    _, port = receiver
    folder = tmp_path_factory.mktemp("traced")
    env = {
        **otel_env(port),
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        **serving_only(folder, MODEL_ID, GEN_MODEL),
    }
    mesh = start_mesh(folder, env)
    yield mesh
    mesh.stop()


def attrs(span) -> dict:
    return {a.key: (a.value.string_value or a.value.int_value) for a in span.attributes}


def test_one_trace_id_spans_http_and_all_four_services(traced_mesh, receiver):
    collector, _ = receiver
    trace_id = os.urandom(16).hex()
    parent = os.urandom(8).hex()
    reply = httpx.post(
        f"{traced_mesh.url}/models/{MODEL_ID}",
        json={"inputs": ["a traced sentence", "and another one"]},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        timeout=30,
    )
    assert reply.status_code == 200
    wanted = {"meshserve-gateway", "meshserve-preprocess", "meshserve-inference", "meshserve-postprocess"}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = collector.for_trace(trace_id)
        if wanted <= {svc for svc, _ in spans} and {"tokenize", "queue_wait", "batch_execute"} <= {
            s.name for _, s in spans
        }:
            break
        time.sleep(0.2)
    spans = collector.for_trace(trace_id)
    assert wanted <= {svc for svc, _ in spans}, sorted({svc for svc, _ in spans})
    by_name = {s.name: (svc, s) for svc, s in spans}
    assert by_name["tokenize"][0] == "meshserve-preprocess"
    assert attrs(by_name["tokenize"][1])["texts"] == 2
    assert by_name["queue_wait"][0] == "meshserve-inference"
    svc, execute = by_name["batch_execute"]
    assert svc == "meshserve-inference" and attrs(execute)["batch_size"] >= 2
    # The HTTP server span continues the caller's traceparent.
    roots = [s for _, s in spans if s.parent_span_id.hex() == parent]
    assert roots, "the gateway's server span must be a child of the caller's span"
    # The request's usage row names the same trace (what links a bill to its trace).
    usage = httpx.get(f"{traced_mesh.url}/v1/usage", params={"limit": 1000}, timeout=30).json()["data"]
    row = next(r for r in usage if r["request_id"] == reply.headers["x-request-id"])
    assert row["trace_id"] == trace_id and row["status"] == 200 and row["input_tokens"] > 0
    assert 0 < row["latency_s"] < 30 and row["time"].endswith("+00:00")
    # Health checks are not traced.
    assert not any("Health" in s.name for _, s in collector.spans)


def test_genai_conventions_on_the_request_span_and_in_the_gateway_metrics(traced_mesh, receiver):
    """A streamed chat and an embeddings request carry OpenTelemetry's gen_ai.* attributes on the
    gateway's server span, and the gateway's /metrics has the gen_ai_* series for them."""
    collector, _ = receiver
    chat_trace, embed_trace = os.urandom(16).hex(), os.urandom(16).hex()
    body = {"model": GEN_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "min_tokens": 6}
    with httpx.stream(
        "POST", f"{traced_mesh.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60,
        headers={"traceparent": f"00-{chat_trace}-{os.urandom(8).hex()}-01"},
    ) as reply:  # fmt: skip
        assert reply.status_code == 200
        assert "[DONE]" in reply.read().decode()
    reply = httpx.post(
        f"{traced_mesh.url}/v1/embeddings", json={"model": MODEL_ID, "input": ["one", "two"]}, timeout=30,
        headers={"traceparent": f"00-{embed_trace}-{os.urandom(8).hex()}-01"},
    )  # fmt: skip
    assert reply.status_code == 200

    def genai_span(trace_id: str):
        found = [s for svc, s in collector.for_trace(trace_id) if "gen_ai.operation.name" in attrs(s)]
        return found[0] if found else None

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (genai_span(chat_trace) and genai_span(embed_trace)):
        time.sleep(0.2)
    chat, embed = attrs(genai_span(chat_trace)), attrs(genai_span(embed_trace))
    assert chat["gen_ai.operation.name"] == "chat" and chat["gen_ai.request.model"] == GEN_MODEL
    assert chat["gen_ai.usage.output_tokens"] == 6 and chat["gen_ai.usage.input_tokens"] > 0
    assert chat["gen_ai.provider.name"] == "meshserve" and chat["gen_ai.response.id"].startswith("chatcmpl-")
    assert embed["gen_ai.operation.name"] == "embeddings" and embed["gen_ai.usage.input_tokens"] > 0
    metrics = httpx.get(f"{traced_mesh.url}/metrics", timeout=10).text
    chat_labels = f'gen_ai_operation_name="chat",gen_ai_provider_name="meshserve",gen_ai_request_model="{GEN_MODEL}"'
    for name in (
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_count",
    ):
        assert f"{name}{{{chat_labels}}} 1.0" in metrics, name
    assert f'gen_ai_client_token_usage_sum{{{chat_labels},gen_ai_token_type="output"}} 6.0' in metrics
    assert 'gen_ai_server_request_duration_seconds_count{error_type="",gen_ai_operation_name="embeddings"' in metrics


class HttpReceiver:
    """An OTLP/HTTP trace collector (protobuf or JSON bodies): what Triton's OpenTelemetry mode
    exports to. Keeps (trace_id, span_id, parent_span_id, name) as hex strings."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.spans: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if "json" in self.headers.get("Content-Type", ""):
                    # OTLP/JSON writes ids as hex strings.
                    for rs in json.loads(body).get("resourceSpans", []):
                        for scope in rs.get("scopeSpans", []):
                            receiver.spans.extend(
                                (
                                    sp["traceId"].lower(),
                                    sp["spanId"].lower(),
                                    sp.get("parentSpanId", "").lower(),
                                    sp["name"],
                                )
                                for sp in scope.get("spans", [])
                            )
                else:
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    for rs in request.resource_spans:
                        for scope in rs.scope_spans:
                            receiver.spans.extend(
                                (sp.trace_id.hex(), sp.span_id.hex(), sp.parent_span_id.hex(), sp.name)
                                for sp in scope.spans
                            )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.skipif(not TRITON_SUPPORTED, reason=TRITON_SKIP_REASON)
def test_trace_continues_into_triton(receiver, models_dir, tmp_path):
    collector, port = receiver
    http_receiver = HttpReceiver()
    env = {
        **otel_env(port),
        "MESHSERVE_INFERENCE_TRITON_TRACE_URL": http_receiver.url,
        **serving_only(tmp_path, MODEL_ID, instances=1),
    }
    mesh = start_mesh(tmp_path, env, backend="triton")
    try:
        # Triton 2.51 sometimes starts a new root trace instead of continuing the caller's (seen in
        # 1 of ~6 runs: its InferRequest span had no parent). Up to three traced requests; at least
        # one must continue our trace, with our span as its parent.
        for _attempt in range(3):
            trace_id = os.urandom(16).hex()
            reply = httpx.post(
                f"{mesh.url}/models/{MODEL_ID}",
                json={"inputs": f"traced through triton {_attempt}"},
                headers={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"},
                timeout=30,
            )
            assert reply.status_code == 200
            deadline = time.monotonic() + 12  # Triton flushes its spans every 5 s
            while time.monotonic() < deadline and not any(s[0] == trace_id for s in http_receiver.spans):
                time.sleep(0.2)
            triton_spans = [s for s in http_receiver.spans if s[0] == trace_id]
            if triton_spans:
                break
        assert triton_spans, f"Triton exported {http_receiver.spans[:3]}, none in our trace"
        # Our spans reach the collector on the services' own export schedule, maybe after Triton's.
        parents = {parent for _, _, parent, _ in triton_spans}
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            ours = {s.span_id.hex() for _, s in collector.for_trace(trace_id)}
            if parents & ours:
                break
            time.sleep(0.2)
        assert parents & ours, "Triton's span must be a child of ours"
    finally:
        mesh.stop()
        http_receiver.server.shutdown()


def test_one_trace_through_envoy_and_every_service(receiver, models_dir, tmp_path):
    collector, port = receiver
    front = free_port()
    env = {
        **otel_env(port),
        "MESHSERVE_SUPERVISOR_REPLICAS": json.dumps({"inference": 2}),
        "MESHSERVE_SUPERVISOR_ENVOY_FRONT_PORT": str(front),
        "MESHSERVE_SUPERVISOR_ENVOY_ADMIN_PORT": str(free_port()),
        **serving_only(tmp_path, MODEL_ID),  # each replica loads it
    }
    mesh = start_mesh(tmp_path, env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Envoy's health check marks the gateway healthy
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{front}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        trace_id = os.urandom(16).hex()
        reply = httpx.post(
            f"http://127.0.0.1:{front}/models/{MODEL_ID}",
            json={"inputs": "through envoy, traced"},
            headers={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"},
            timeout=30,
        )
        assert reply.status_code == 200
        wanted = {
            "meshserve-envoy",
            "meshserve-gateway",
            "meshserve-preprocess",
            "meshserve-inference",
            "meshserve-postprocess",
        }
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not wanted <= {svc for svc, _ in collector.for_trace(trace_id)}:
            time.sleep(0.2)
        assert wanted <= {svc for svc, _ in collector.for_trace(trace_id)}, {
            svc for svc, _ in collector.for_trace(trace_id)
        }
    finally:
        mesh.stop()

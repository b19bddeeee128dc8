"""OpenTelemetry's GenAI semantic conventions on the gateway: the `gen_ai.*` attributes of the
request's span and the `gen_ai.client.*` / `gen_ai.server.*` metrics, beside our own
(`meshserve_http_*`, the ledger), so that community GenAI dashboards find what they query.

Recorded once per finished generation or embeddings request (Metering's last step; other HF tasks
are not GenAI operations). The gateway is the *server* of the API its callers use, and the
*client* of whichever provider answered (our own mesh, `gen_ai.provider.name` "meshserve", or a
remote one): the client metrics carry that provider, the server metrics the same request seen from
the caller's side. Durations are the whole request (admission, queueing and a stream's last byte).
Prometheus names follow OpenTelemetry's own conversion: dots become underscores and the unit a
suffix (`gen_ai.server.time_to_first_token`, seconds -> `gen_ai_server_time_to_first_token_seconds`);
bucket boundaries are the ones the conventions advise.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opentelemetry import trace
from prometheus_client import Histogram

if TYPE_CHECKING:
    from services.gateway.control.metering import Metered

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Number of input and output tokens used (gen_ai.client.token.usage).",
    [*LABELS, "gen_ai_token_type"],
    buckets=TOKEN_BUCKETS,
)
CLIENT_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "GenAI operation duration, per provider that answered (gen_ai.client.operation.duration).",
    [*LABELS, "error_type"],
    buckets=DURATION_BUCKETS,
)
SERVER_DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "GenAI server request duration (gen_ai.server.request.duration).",
    [*LABELS, "error_type"],
    buckets=DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Time to generate the first token of a streamed response (gen_ai.server.time_to_first_token).",
    LABELS,
    buckets=TTFT_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "Time per output token after the first, of a streamed response (gen_ai.server.time_per_output_token).",
    LABELS,
    buckets=TPOT_BUCKETS,
)
LOCAL_PROVIDER = "meshserve"  # gen_ai.provider.name of our own mesh (Metered.provider "local")
_CHILDREN_MAX = 4096  # label children cached per metric before the cache starts over


def operation_of(task: str, route: str) -> str | None:
    """The `gen_ai.operation.name` of a request, or None for a task that is not a GenAI operation."""
    if task == "text-generation":
        return "chat" if route.endswith("/chat/completions") else "text_completion"
    if task == "feature-extraction":
        return "embeddings"
    return None


class _Children:
    """Label children looked up once per label set (a lookup per request shows in profiles)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, object] = {}

    def get(self, metric: Histogram, labels: tuple):
        key = (metric, labels)
        child = self._cache.get(key)
        if child is None:
            if len(self._cache) >= _CHILDREN_MAX:
                self._cache.clear()
            child = self._cache[key] = metric.labels(*labels)
        return child


_children = _Children()


def record(metered: Metered, status: int, now: float | None = None) -> None:
    """The finished request's GenAI metrics and span attributes; nothing for other tasks."""
    operation = operation_of(metered.task, metered.route)
    if operation is None:
        return
    now = time.perf_counter() if now is None else now
    provider = LOCAL_PROVIDER if metered.provider == "local" else metered.provider
    labels = (operation, provider, metered.entry.id)
    error = "" if status < 400 else str(status)
    duration = now - metered.started
    child = _children.get
    child(CLIENT_DURATION, (*labels, error)).observe(duration)
    child(SERVER_DURATION, (*labels, error)).observe(duration)
    if status < 400 or metered.delivered:
        child(TOKEN_USAGE, (*labels, "input")).observe(metered.input_tokens)
        if operation != "embeddings":
            child(TOKEN_USAGE, (*labels, "output")).observe(metered.output_tokens)
    first = metered.first_token_at
    if first is not None:
        child(TIME_TO_FIRST_TOKEN, labels).observe(first - metered.started)
        if metered.output_tokens > 1:
            child(TIME_PER_OUTPUT_TOKEN, labels).observe((now - first) / (metered.output_tokens - 1))
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(span_attributes(metered, operation, provider, error))


def span_attributes(metered: Metered, operation: str, provider: str, error: str) -> dict:
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": metered.entry.id,
        "gen_ai.usage.input_tokens": metered.input_tokens,
    }
    if operation != "embeddings":
        attributes["gen_ai.usage.output_tokens"] = metered.output_tokens
    if error:
        attributes["error.type"] = error
    return attributes


def annotate_response(response_id: str, finish_reasons: list[str] | None = None, model: str | None = None) -> None:
    """The response's own attributes on the current span (the routes know them): its id, why each
    choice ended, and the model that answered."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes: dict = {"gen_ai.response.id": response_id}
    if finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = list(finish_reasons)
    if model:
        attributes["gen_ai.response.model"] = model
    span.set_attributes(attributes)

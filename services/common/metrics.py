"""Prometheus metrics shared by every service: gRPC server calls, and the /metrics endpoint.

gRPC calls are counted twice: under our own names (`meshserve_grpc_server_*`, labels service /
method / code, what our dashboard and alerts use) and under the names and labels of
go-grpc-prometheus / java-grpc-prometheus (`grpc_server_started_total`, `grpc_server_handled_total`,
`grpc_server_handling_seconds` with grpc_type / grpc_service / grpc_method / grpc_code), which the
community's gRPC dashboards and alerts query.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

# Latency buckets in seconds, from 0.5 ms (a hop) to 30 s (a long queue).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

GRPC_HANDLED = Counter(
    "meshserve_grpc_server_handled_total",
    "gRPC calls completed by this server, by method and status code.",
    ["service", "method", "code"],
)
GRPC_SECONDS = Histogram(
    "meshserve_grpc_server_handling_seconds",
    "Time to handle one gRPC call, from receipt to status.",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)

# The conventional gRPC server metrics (go-grpc-prometheus's names and labels).
GRPC_TYPES = ("unary", "client_stream", "server_stream", "bidi_stream")
CONVENTIONAL_STARTED = Counter(
    "grpc_server_started_total",
    "Total number of RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
CONVENTIONAL_HANDLED = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
CONVENTIONAL_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)


def start_metrics_server(host: str, port: int) -> int | None:
    """Serve the default registry on http://host:port/metrics in a thread; the bound port, or None."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound = server.server_address[1]
    log.info("metrics endpoint listening", extra={"fields": {"url": f"http://{host}:{bound}/metrics"}})
    return bound

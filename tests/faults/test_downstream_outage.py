"""A stage that dies: callers get 503 + Retry-After in their dialect, the supervisor restarts
it and says so, and the mesh recovers without restarting the other services."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers import MODEL_ID, start_mesh

pytestmark = pytest.mark.xdist_group("faults")


@pytest.fixture
def mesh(models_dir, tmp_path):
    # A first restart delay long enough to observe the outage deterministically.
    running = start_mesh(tmp_path, {"MESHSERVE_SUPERVISOR_RESTART_BACKOFF_S": "4"})
    yield running
    running.stop()


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("service", ["preprocess", "postprocess", "inference"])
def test_killed_stage_gives_503_with_retry_after_then_recovers(mesh, service):
    others = {name: mesh.child(name).pid for name in ("gateway", "preprocess", "inference", "postprocess")}
    victim = mesh.child(service)
    victim.kill()
    victim.wait(10)

    def not_ready() -> bool:
        ready = httpx.get(f"{mesh.url}/readyz", timeout=5)
        return ready.status_code == 503 and ready.headers["retry-after"] and not ready.json()["checks"][service]

    assert wait_for(not_ready, 3), "readiness must go red while a stage is down"

    hf = httpx.post(f"{mesh.url}/models/{MODEL_ID}", json={"inputs": "hello"}, timeout=30)
    assert hf.status_code == 503, hf.text
    assert int(hf.headers["retry-after"]) >= 1
    assert hf.json()["error_type"] == "overloaded" and service in hf.json()["error"]
    openai = httpx.post(f"{mesh.url}/v1/embeddings", json={"model": MODEL_ID, "input": "hello"}, timeout=30)
    assert openai.status_code == 503 and openai.headers["retry-after"]
    assert openai.json()["error"]["code"] == "upstream_unavailable"

    def recovered() -> bool:
        reply = httpx.post(f"{mesh.url}/models/{MODEL_ID}", json={"inputs": "hello"}, timeout=30)
        return reply.status_code == 200

    assert wait_for(recovered, 90), mesh.log()[-3000:]
    assert httpx.get(f"{mesh.url}/readyz", timeout=5).status_code == 200
    assert f"{service} exited" in mesh.log() and "restarting" in mesh.log()
    # Only the victim was restarted.
    for name, pid in others.items():
        if name != service:
            assert mesh.child(name).pid == pid

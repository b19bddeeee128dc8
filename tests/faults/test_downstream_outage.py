"""A stage that dies: callers get 503 + Retry-After in their dialect, the supervisor restarts
it and says so, and the mesh recovers without restarting the other services."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import MODEL_ID, START_TIMEOUT_S, TRITON_SKIP_REASON, TRITON_SUPPORTED, serving_only, start_mesh

pytestmark = pytest.mark.xdist_group("faults")


@pytest.fixture
def mesh(models_dir, tmp_path):
    # A first restart delay long enough to observe the outage deterministically.
    env = {"MESHSERVE_SUPERVISOR_RESTART_BACKOFF_S": "4", **serving_only(tmp_path, MODEL_ID)}
    running = start_mesh(tmp_path, env)
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

    assert wait_for(recovered, START_TIMEOUT_S), mesh.log()[-3000:]
    # A restarted inference service serves each model as soon as it is loaded, but is ready (Triton's
    # strict readiness) only once every catalog model is: the first answer can come before that.
    assert wait_for(lambda: httpx.get(f"{mesh.url}/readyz", timeout=5).status_code == 200, START_TIMEOUT_S)
    assert f"{service} exited" in mesh.log() and "restarting" in mesh.log()
    # Only the victim was restarted.
    for name, pid in others.items():
        if name != service:
            assert mesh.child(name).pid == pid


@pytest.mark.skipif(not TRITON_SUPPORTED, reason=TRITON_SKIP_REASON)
def test_killed_triton_is_noticed_restarted_and_service_recovers(models_dir, tmp_path):
    # Regions of other Tritons on this host (another mesh, another worker) must outlive ours.
    decoys = [
        Path("/dev/shm") / f"{name}{tmp_path.name}"
        for name in ("triton_python_backend_shm_region_", "meshserve_triton_shm_1_")
    ]
    for decoy in decoys:
        decoy.write_bytes(b"")
    # the restart is the subject
    env = {"MESHSERVE_SUPERVISOR_RESTART_BACKOFF_S": "4", **serving_only(tmp_path, MODEL_ID, instances=1)}
    mesh = start_mesh(tmp_path, env, backend="triton")
    try:
        others = {name: mesh.child(name).pid for name in ("gateway", "preprocess", "postprocess")}
        launcher = mesh.child("inference")
        own = f"meshserve_triton_shm_{launcher.pid}_*"
        assert list(Path("/dev/shm").glob(own)), "the Python stubs' regions carry the launcher's prefix"
        (triton,) = [p for p in launcher.children(recursive=True) if p.name() == "tritonserver"]
        triton.kill()

        def not_ready() -> bool:
            ready = httpx.get(f"{mesh.url}/readyz", timeout=5)
            return ready.status_code == 503 and not ready.json()["checks"]["inference"]

        assert wait_for(not_ready, 5), "readiness must go red when Triton dies"
        reply = httpx.post(f"{mesh.url}/v1/embeddings", json={"model": MODEL_ID, "input": "hello"}, timeout=30)
        assert reply.status_code == 503 and int(reply.headers["retry-after"]) >= 1

        def recovered() -> bool:
            return httpx.post(f"{mesh.url}/models/{MODEL_ID}", json={"inputs": "hello"}, timeout=30).status_code == 200

        # Triton reloads every model after its restart: a minute or more on a loaded 2-core machine.
        assert wait_for(recovered, START_TIMEOUT_S), mesh.log()[-3000:]
        assert "inference exited" in mesh.log() and "restarting" in mesh.log()
        for name, pid in others.items():
            assert mesh.child(name).pid == pid
        new_triton = [p for p in mesh.child("inference").children(recursive=True) if p.name() == "tritonserver"]
        assert new_triton and new_triton[0].pid != triton.pid
        assert not list(Path("/dev/shm").glob(own)), "the dead Triton's regions are removed"
        assert all(decoy.exists() for decoy in decoys), "another Triton's regions are left alone"
    finally:
        mesh.stop()
        for decoy in decoys:
            decoy.unlink(missing_ok=True)

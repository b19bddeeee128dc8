"""Replicated stages and gateways behind a real Envoy (`meshserve up --replicas ...`): under a bounded
load, kill -9 one of two inference replicas and SIGTERM one of two preprocess replicas, or kill -9 one
of two gateways -> no request fails."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from tests.faults.test_graceful_shutdown import load
from tests.helpers import MODEL_ID, free_port, serving_only, start_mesh

pytestmark = pytest.mark.xdist_group("faults")


def healthy_hosts(admin: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in httpx.get(admin + "/clusters", timeout=5).text.splitlines():
        if line.endswith("::health_flags::healthy"):
            cluster = line.split("::", 1)[0]
            counts[cluster] = counts.get(cluster, 0) + 1
    return counts


def test_replica_failures_behind_envoy_lose_no_requests(models_dir, tmp_path):
    admin_port = free_port()
    env = {
        "MESHSERVE_SUPERVISOR_REPLICAS": json.dumps({"inference": 2, "preprocess": 2}),
        "MESHSERVE_SUPERVISOR_ENVOY_FRONT_PORT": str(free_port()),
        "MESHSERVE_SUPERVISOR_ENVOY_ADMIN_PORT": str(admin_port),
        "MESHSERVE_SUPERVISOR_RESTART_BACKOFF_S": "60",  # the victims stay down for the rest of the load
        **serving_only(tmp_path, MODEL_ID),  # each inference replica loads it
    }
    mesh = start_mesh(tmp_path, env)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        deadline = time.monotonic() + 90  # two gateways, Envoy and its health checks start on 2 busy cores
        while time.monotonic() < deadline and healthy_hosts(admin).get("inference", 0) < 2:
            time.sleep(0.2)
        hosts = healthy_hosts(admin)
        assert hosts.get("inference") == 2 and hosts.get("preprocess") == 2, hosts
        inference, preprocess = mesh.children("inference"), mesh.children("preprocess")
        assert len(inference) == 2 and len(preprocess) == 2
        hit: list[float] = []

        def progress(done: int) -> None:
            if done == 150 and not hit:
                hit.append(time.monotonic())
                inference[0].send_signal(signal.SIGKILL)
                preprocess[1].send_signal(signal.SIGTERM)

        results = asyncio.run(load(f"{mesh.url}/models/{MODEL_ID}", total=600, concurrency=16, on_progress=progress))
        assert hit, "the faults were never injected"
        failures = [r for r in results if r["status"] != 200]
        assert not failures, failures[:3]
        assert len(results) == 600
        stats = httpx.get(admin + "/stats", timeout=5).text
        assert "cluster.inference.upstream_rq_2xx" in stats
        # Both victims are gone (the SIGTERMed replica drains for replica_drain_wait_s first, so it
        # may outlive a fast load); the survivors carried the load.
        deadline = time.monotonic() + 15
        while (inference[0].is_running() or preprocess[1].is_running()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not inference[0].is_running() and not preprocess[1].is_running()
    finally:
        mesh.stop()


def host_successes(admin: str, cluster: str) -> dict[str, int]:
    """rq_success per host of one Envoy cluster (admin /clusters)."""
    counts: dict[str, int] = {}
    for line in httpx.get(admin + "/clusters", timeout=5).text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and parts[2] == "rq_success":
            counts[parts[1]] = int(parts[3])
    return counts


def test_gateway_replica_killed_behind_envoy_loses_no_requests(models_dir, tmp_path):
    """`--replicas gateway=2`: Envoy's front port is the REST entry point; kill -9 one gateway -> no request fails."""
    front_port, admin_port = free_port(), free_port()
    env = {
        "MESHSERVE_SUPERVISOR_REPLICAS": json.dumps({"gateway": 2}),
        "MESHSERVE_SUPERVISOR_ENVOY_FRONT_PORT": str(front_port),
        "MESHSERVE_SUPERVISOR_ENVOY_ADMIN_PORT": str(admin_port),
        "MESHSERVE_SUPERVISOR_RESTART_BACKOFF_S": "60",  # the victim stays down for the rest of the load
        # Offset 0: gateway replica i serves on the mesh's http port + i, so start_mesh's readiness wait
        # polls replica 0 directly (startup /readyz 503s sent through the front would count toward
        # Envoy's outlier detection and could eject a replica before the load starts).
        "MESHSERVE_SUPERVISOR_REPLICA_PORT_OFFSET": "0",
        **serving_only(tmp_path, MODEL_ID),
    }
    front = f"http://127.0.0.1:{front_port}"
    mesh = start_mesh(tmp_path, env)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        deadline = time.monotonic() + 90  # two gateways, Envoy and its health checks start on 2 busy cores
        # The supervisor says ready once every replica and Envoy's front answer /readyz (Envoy may
        # still be starting when the first replica is ready).
        while time.monotonic() < deadline and "meshserve is ready" not in mesh.log():
            time.sleep(0.2)
        while time.monotonic() < deadline and healthy_hosts(admin).get("gateway", 0) < 2:
            time.sleep(0.2)
        assert healthy_hosts(admin).get("gateway") == 2, healthy_hosts(admin)
        # Envoy's worker may keep routing to the first healthy host for a health-check round after
        # the second one turns healthy: wait until the front has reached both.
        while time.monotonic() < deadline and not (
            len(start := host_successes(admin, "gateway")) == 2 and all(start.values())
        ):
            assert httpx.get(front + "/readyz", timeout=5).status_code == 200
            time.sleep(0.1)
        assert all(start.values()), start
        gateways = mesh.children("gateway")
        assert len(gateways) == 2
        before: list[dict[str, int]] = []

        def progress(done: int) -> None:
            if done == 100 and not before:
                before.append(host_successes(admin, "gateway"))
                gateways[0].send_signal(signal.SIGKILL)

        results = asyncio.run(load(f"{front}/models/{MODEL_ID}", total=400, concurrency=16, on_progress=progress))
        assert before, "the fault was never injected"
        failures = [r for r in results if r["status"] != 200]
        assert not failures, failures[:3]
        assert len(results) == 400
        # Both replicas carried some of the load before the kill; the survivor carried the rest.
        assert all(before[0][host] > start[host] for host in start), (start, before[0])
        after = host_successes(admin, "gateway")
        assert sum(after.values()) - sum(before[0].values()) >= 300 - 16, (before[0], after)
        assert not gateways[0].is_running() and gateways[1].is_running()
        assert f"REST API   {front}" in mesh.log()  # the supervisor points clients at Envoy's front port
    finally:
        mesh.stop()

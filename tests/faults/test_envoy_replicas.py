"""Replicated stages behind a real Envoy (`meshserve up --replicas ...`): under a bounded load,
kill -9 one of two inference replicas and SIGTERM one of two preprocess replicas -> no request fails."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from tests.faults.test_graceful_shutdown import load
from tests.helpers import MODEL_ID, free_port, start_mesh

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
    }
    mesh = start_mesh(tmp_path, env)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        deadline = time.monotonic() + 30
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

"""CPU per request of TEI's /embed (and /embed_all when served) on a real embedded mesh.

Starts `meshserve up --backend embedded` on free ports (tests.helpers.start_mesh), sends N sequential
requests of one sentence per round, and reads each stage's CPU time (user + system, psutil) before
and after: on a shared machine CPU time is the figure to compare, wall time is printed beside it.

    .venv/bin/python -m bench.embed_cpu [--requests 200] [--rounds 3] [--routes /embed,/embed_all]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.helpers import mesh_home, start_mesh

STAGES = ("gateway", "preprocess", "inference", "postprocess")
TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


def cpu_s(mesh) -> dict[str, float]:
    times = {}
    for stage in STAGES:
        t = mesh.child(stage).cpu_times()
        times[stage] = t.user + t.system
    return times


def one_round(mesh, client: httpx.Client, route: str, requests: int) -> dict:
    before, started = cpu_s(mesh), time.perf_counter()
    for _ in range(requests):
        reply = client.post(route, json={"inputs": TEXT})
        reply.raise_for_status()
    wall = time.perf_counter() - started
    after = cpu_s(mesh)
    per_stage = {s: (after[s] - before[s]) / requests * 1e6 for s in STAGES}
    return {"cpu_us_per_request": sum(per_stage.values()), "per_stage_us": per_stage, "wall_ms": wall / requests * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--routes", default="/embed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="embed-cpu-"))
    mesh = start_mesh(tmp, home=mesh_home(tmp / "home"))  # a gateway database of its own, the shared models
    results = {}
    try:
        with httpx.Client(base_url=mesh.url, timeout=60) as client:
            for route in args.routes.split(","):
                one_round(mesh, client, route, 20)  # warm-up
                rounds = [one_round(mesh, client, route, args.requests) for _ in range(args.rounds)]
                results[route] = {
                    "rounds": rounds,
                    "median_cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in rounds),
                    "median_inference_cpu_us": statistics.median(r["per_stage_us"]["inference"] for r in rounds),
                    "median_wall_ms": statistics.median(r["wall_ms"] for r in rounds),
                }
    finally:
        mesh.stop()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

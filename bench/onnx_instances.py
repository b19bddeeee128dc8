"""ONNX Runtime (or torch) at c=64 through the full mesh: instances x threads of the all-MiniLM entry, A/B.

Issue #18's third target: the mesh on `runtime_engine: onnx` kept ~1.57 of 2 cores on inference
at c=64 (bubbles between batches). This starts one mesh per variant on the shipped catalog with the
entry on onnx and `instances` / `threads` set, runs the closed-loop `POST /v1/embeddings` point of
bench/run_embeddings.py (one sentence per request) and prints req/s, CPU per request per service
and the batches, in interleaved rounds (medians are what to trust on a shared machine):

    python -m bench.onnx_instances --variants 1x2,2x1 --rounds 2 --concurrency 64
    python -m bench.onnx_instances --engine torch --variants 1x2,2x1   # the same for torch
    python -m bench.onnx_instances --engine torch --model sentiment    # text classification, HF route

`0x0` leaves both unset (the catalog's ONNX_LAYOUT for onnx entries).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

from bench.common import REPO, Probe, closed_loop
from bench.run_embeddings import SENTENCES
from tests.helpers import MODEL_ID, start_mesh

# --model: (catalog id, inference model name, route, body of one sentence)
MODELS = {
    "minilm": (MODEL_ID, "all-MiniLM-L6-v2", "/v1/embeddings", lambda text: {"model": MODEL_ID, "input": text}),
    "sentiment": (
        "meshserve/sentiment-minilm",
        "sentiment-minilm",
        "/models/meshserve/sentiment-minilm",
        lambda text: {"inputs": text},
    ),
}


def catalog(folder: Path, instances: int, threads: int, engine: str = "onnx", model: str = "minilm") -> Path:
    data = yaml.safe_load((REPO / "catalog.yaml").read_text())
    for entry in data["models"]:
        if entry["id"] == MODELS[model][0]:
            entry["inference"].update(runtime_engine=engine, instances=instances, threads=threads)
            if not instances:  # 0x0: neither set, the catalog's ONNX_LAYOUT applies
                del entry["inference"]["instances"], entry["inference"]["threads"]
    path = folder / f"catalog-{model}-{engine}-{instances}x{threads}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def point(url: str, probe: Probe, concurrency: int, model: str = "minilm") -> dict:
    import aiohttp

    _, _, route, body = MODELS[model]
    bodies = [json.dumps(body(text)).encode() for text in SENTENCES]
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json", "X-Use-Cache": "false"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def call(index: int) -> None:
            async with session.post(url + route, data=bodies[index % len(bodies)]) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}")

        return await closed_loop(call, concurrency, probe)


def run_variant(
    tmp: Path, instances: int, threads: int, concurrency: int, engine: str = "onnx", model: str = "minilm"
) -> dict:
    import uvloop

    folder = tmp / f"{model}-{engine}-{instances}x{threads}"
    folder.mkdir(parents=True, exist_ok=True)
    mesh = start_mesh(folder, {"MESHSERVE_CATALOG": str(catalog(folder, instances, threads, engine, model))})
    try:

        async def go():
            probe = Probe(mesh.inference_target, MODELS[model][1], mesh.process.pid, mesh.service_token)
            try:
                return await point(mesh.url, probe, concurrency, model)
            finally:
                await probe.close()

        return uvloop.run(go())
    finally:
        mesh.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="1x2,2x1", help="instances x threads, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--engine", choices=("onnx", "torch"), default="onnx", help="the entry's runtime_engine")
    p.add_argument("--model", choices=tuple(MODELS), default="minilm", help="all-MiniLM (embeddings) or sentiment")
    args = p.parse_args(argv)
    variants = [tuple(int(x) for x in v.split("x")) for v in args.variants.split(",")]
    results: dict[str, list[dict]] = {f"{i}x{t}": [] for i, t in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for instances, threads in variants:
                got = run_variant(Path(tmp), instances, threads, args.concurrency, args.engine, args.model)
                key = f"{instances}x{threads}"
                results[key].append(got)
                stats = got["model_stats"]
                print(
                    f"{key}: {got['rps']} req/s p50 {got['p50_ms']} ms avg batch {stats['avg_batch']} "
                    f"cpu/request {got['cpu_us_per_request']} busy {got['cpu']}",
                    flush=True,
                )
    for key, points in results.items():
        print(f"{key}: median {statistics.median(p['rps'] for p in points)} req/s over {len(points)} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

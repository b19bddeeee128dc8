"""Embeddings benchmark: (a) raw in-process torch, (b) the inference service alone over gRPC,
(c) the full mesh over REST -- one sentence per request, concurrency 1/16/64, in one run.

Every figure is also given as a ratio to (a), measured in the same run on the same machine.
Loops are bounded in time and count and stop by themselves; the mesh is stopped by PID.

    python -m bench.run_embeddings            # BENCH_SECONDS=8 per point by default
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from tests.helpers import MODEL_ID, meshserve_home, start_mesh

RESULTS = Path(__file__).parent / "results"
SECONDS = float(os.environ.get("BENCH_SECONDS", "8"))
WARMUP_S = 2.0
MAX_REQUESTS = 200_000
CONCURRENCY = (1, 16, 64)
RAW_BATCHES = (1, 8, 16, 32)
WORDS = (
    "the quick brown fox jumps over lazy dogs near river banks while children watch from hills "
    "under bright summer skies and merchants sell fresh bread cheese apples honey wine to travelers"
).split()


def sentences(n: int) -> list[str]:
    """Deterministic ~10-word sentences that differ from each other (so nothing is cached)."""
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(WORDS, size=10)) for _ in range(n)]


def percentiles(latencies_s: list[float]) -> dict:
    arr = np.array(latencies_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(arr, q)), 2) for q in (50, 90, 99)} if len(arr) else {}


# -- (a) raw in-process torch ---------------------------------------------------------------------
def bench_raw(model_dir: Path) -> dict:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    torch.set_num_threads(2)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    tok.enable_truncation(256)
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    pool = sentences(4096)
    points = []
    for batch in RAW_BATCHES:

        def step(i: int, batch: int = batch) -> None:
            enc = tok.encode_batch(pool[i : i + batch])
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            with torch.inference_mode():
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                (hidden * weights).sum(1) / weights.sum(1)

        for i in range(3):
            step(i * batch % 2048)
        times, done, start = [], 0, time.perf_counter()
        while time.perf_counter() - start < SECONDS / 2:
            t0 = time.perf_counter()
            step(done % 2048)
            times.append(time.perf_counter() - t0)
            done += batch
        elapsed = time.perf_counter() - start
        points.append({"batch": batch, "sentences_per_s": round(done / elapsed, 1), **percentiles(times)})
        print(f"  raw batch {batch:>2}: {done / elapsed:7.1f} sentences/s, p50 {points[-1]['p50_ms']} ms", flush=True)
    best = max(points, key=lambda p: p["sentences_per_s"])
    return {
        "threads": 2,
        "points": points,
        "limit_sentences_per_s": best["sentences_per_s"],
        "best_batch": best["batch"],
        "batch1_p50_ms": points[0]["p50_ms"],
    }


# -- a bounded closed-loop load generator ---------------------------------------------------------
async def closed_loop(call, concurrency: int) -> dict:
    """`concurrency` workers call `call(i)` back to back: warm-up, then a timed window."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    measuring = False
    stop_at = time.perf_counter() + WARMUP_S + SECONDS

    async def worker():
        nonlocal counter, errors
        while time.perf_counter() < stop_at and counter < MAX_REQUESTS:
            counter += 1
            t0 = time.perf_counter()
            try:
                await call(counter)
            except Exception:
                errors += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - t0)

    async def window():
        nonlocal measuring
        await asyncio.sleep(WARMUP_S)
        measuring = True
        return time.perf_counter()

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    started = await window()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "errors": errors,
        **percentiles(latencies),
    }


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


# -- (b) inference service alone ------------------------------------------------------------------
async def bench_inference(target: str, model_name: str, model_dir: Path, stats) -> list[dict]:
    import grpc
    from tokenizers import Tokenizer
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads to a fixed 128 tokens; send real lengths
    requests = []
    for text in sentences(1024):
        enc = tok.encode(text)
        req = service_pb2.ModelInferRequest(model_name=model_name)
        for name, values in (("input_ids", enc.ids), ("attention_mask", enc.attention_mask)):
            req.inputs.add(name=name, datatype="INT64", shape=[1, len(values)])
            req.raw_input_contents.append(np.array([values], dtype="<i8").tobytes())
        requests.append(req)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def call(i: int):
            await stub.ModelInfer(requests[i % len(requests)], timeout=60)

        return [await measured(lambda c=c: closed_loop(call, c), stats) for c in CONCURRENCY]


# -- (c) full mesh over REST ----------------------------------------------------------------------
async def bench_mesh(url: str, stats) -> list[dict]:
    import aiohttp

    bodies = [json.dumps({"model": MODEL_ID, "input": s}).encode() for s in sentences(1024)]
    connector = aiohttp.TCPConnector(limit=max(CONCURRENCY))
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:

        async def call(i: int):
            async with session.post(url + "/v1/embeddings", data=bodies[i % len(bodies)]) as reply:
                if reply.status != 200:
                    raise RuntimeError(reply.status)
                await reply.read()

        return [await measured(lambda c=c: closed_loop(call, c), stats) for c in CONCURRENCY]


async def measured(run, stats) -> dict:
    """Run one point; add the server-side batch statistics and CPU used over the same span."""
    before_stats, before_cpu = await stats.snapshot(), stats.cpu()
    result = await run()
    after_stats, after_cpu = await stats.snapshot(), stats.cpu()
    inferences = after_stats[0] - before_stats[0]
    executions = after_stats[1] - before_stats[1]
    result["avg_batch"] = round(inferences / executions, 2) if executions else None
    result["server_cpu_s"] = round(after_cpu - before_cpu, 2)
    print(
        f"    c={result['concurrency']:>2}: {result['rps']:7.1f} req/s  p50 {result.get('p50_ms')} ms  "
        f"p99 {result.get('p99_ms')} ms  avg batch {result['avg_batch']}  errors {result['errors']}",
        flush=True,
    )
    return result


class ServerStats:
    def __init__(self, target: str, model_name: str, pids: list[int]) -> None:
        self.target, self.model_name, self.pids = target, model_name, pids

    async def snapshot(self) -> tuple[int, int]:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        async with grpc.aio.insecure_channel(self.target) as channel:
            reply = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                service_pb2.ModelStatisticsRequest(name=self.model_name)
            )
        s = reply.model_stats[0]
        return s.inference_count, s.execution_count

    def cpu(self) -> float:
        return cpu_of(self.pids)


def ratios(points: list[dict], raw: dict) -> None:
    for p in points:
        p["ratio_to_raw_limit"] = round(p["rps"] / raw["limit_sentences_per_s"], 3)
        if p["concurrency"] == 1 and "p50_ms" in p:
            p["p50_over_raw_batch1_ms"] = round(p["p50_ms"] - raw["batch1_p50_ms"], 2)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("inference_grpc", "inference service alone (gRPC)"), ("mesh_rest", "full mesh (REST)")):
        pts = result[key]
        ax1.plot([p["concurrency"] for p in pts], [p["rps"] for p in pts], marker="o", label=label)
        ax2.plot([p["concurrency"] for p in pts], [p["p50_ms"] for p in pts], marker="o", label=label)
    limit = result["raw"]["limit_sentences_per_s"]
    ax1.axhline(limit, color="grey", linestyle="--", label=f"raw torch limit ({limit:.0f}/s)")
    ax1.axhline(0.9 * limit, color="grey", linestyle=":", label="90% of raw")
    ax1.axhline(0.7 * limit, color="lightgrey", linestyle=":", label="70% of raw")
    ax2.axhline(result["raw"]["batch1_p50_ms"], color="grey", linestyle="--", label="raw batch-1 p50")
    for ax, title, ylabel in ((ax1, "Throughput", "requests/s (1 sentence each)"), (ax2, "Median latency", "p50 ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_title(f"all-MiniLM-L6-v2 — {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    from services.common.catalog import Catalog
    from services.common.settings import REPO_ROOT

    entry = Catalog.load(REPO_ROOT / "catalog.yaml").get(MODEL_ID)
    model_dir = meshserve_home() / "models" / MODEL_ID / "model"
    print(f"(a) raw in-process torch, {SECONDS / 2:.0f} s per batch size", flush=True)
    raw = bench_raw(model_dir)
    print("(b)+(c) starting the mesh", flush=True)
    mesh = start_mesh(Path(tempfile.mkdtemp(prefix="bench-")))
    try:
        pids = [mesh.child(s).pid for s in ("gateway", "preprocess", "inference", "postprocess")]
        stats = ServerStats(mesh.inference_target, entry.inference.name, pids)
        print("(b) inference service alone over gRPC", flush=True)
        inference = asyncio.run(bench_inference(mesh.inference_target, entry.inference.name, model_dir, stats))
        print("(c) full mesh over REST (/v1/embeddings)", flush=True)
        rest = asyncio.run(bench_mesh(mesh.url, stats))
    finally:
        mesh.stop()
    ratios(inference, raw)
    ratios(rest, raw)
    result = {
        "benchmark": "embeddings",
        "model": MODEL_ID,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds_per_point": SECONDS,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
        },
        "catalog_inference": entry.inference.model_dump(mode="json"),
        "raw": raw,
        "inference_grpc": inference,
        "mesh_rest": rest,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embeddings.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "embeddings.png")
    print(
        f"\nraw limit {raw['limit_sentences_per_s']}/s (batch {raw['best_batch']}), raw batch-1 p50 {raw['batch1_p50_ms']} ms"
    )
    print("| path | c | req/s | ratio to raw | p50 ms | p99 ms | avg batch |\n|---|---|---|---|---|---|---|")
    for name, pts in (("inference gRPC", inference), ("mesh REST", rest)):
        for p in pts:
            print(
                f"| {name} | {p['concurrency']} | {p['rps']} | {p['ratio_to_raw_limit']} | {p.get('p50_ms')} | "
                f"{p.get('p99_ms')} | {p['avg_batch']} |"
            )
    print(f"\nwrote {RESULTS / 'embeddings.json'} and {RESULTS / 'embeddings.png'}")


if __name__ == "__main__":
    main()

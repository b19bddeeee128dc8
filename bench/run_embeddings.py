"""Embeddings benchmark, in one run on this machine, one sentence per request (all-MiniLM-L6-v2):

  (a) raw in-process torch at batch 1/8/16/32: the physical limit of this box,
  (b) the inference service alone: KServe v2 ModelInfer over gRPC at concurrency 1/16/64,
  (c) the full mesh: POST /v1/embeddings (gateway -> preprocess -> inference -> postprocess) at 1/16/64,
  (d) the same mesh with the catalog entry on `runtime_engine: onnx` at 1/64, beside (a') raw in-process
      onnxruntime on the same exported graph at batch 1/32,
  (e) infinity-emb on the same weights (its own venv, .venv-bench/infinity: `make bench-infinity-venv`),
      its CPU engines that run here (INFINITY_ENGINES) at c=64, when that venv is there (else the
      result says why not),
  (f) texts of very different lengths (1-5 of the sentences joined, MIXED_TEXTS): raw torch's padded
      batches at 8/16/32 against the mesh at c=64 on torch, with the catalog's length-sorted chunks
      (`inference.chunk_rows`) and with every batch run whole (`chunk_rows: 0`).

Every (b)/(c) point is also given as a ratio to (a)'s limit from the same run, so runs on different
days or machines compare by ratio, not by absolute numbers. Writes bench/results/embeddings.json and
bench/results/embeddings.png and prints a markdown summary.

    python -m bench.run_embeddings                   # BENCH_SECONDS=8 per point (about 5 minutes)
    BENCH_SECONDS=2 python -m bench.run_embeddings   # smoke run
    python -m bench.run_embeddings --infinity PATH   # another infinity_emb command ('' skips (e))
    python -m bench.run_embeddings --results DIR     # write the JSON and PNG elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    MAX_REQUESTS,
    REPO,
    REQUEST_TIMEOUT_S,
    RESULTS,
    SECONDS,
    WARMUP_S,
    Call,
    HttpStatusError,
    ModelStats,
    Probe,
    closed_loop,
    count_noisy,
    cpu_sample,
    finish_figure,
    git_info,
    machine_info,
    noisy_warning,
    time_batches,
    write_results,
)
from tests.helpers import MODEL_ID, Mesh, free_port, meshserve_home, start_mesh

CONCURRENCY = (1, 16, 64)
RAW_BATCHES = (1, 8, 16, 32)
RAW_THREADS = 2  # the machine has 2 cores; perf-baselines.md §2 measured the ceiling at 2 threads
ONNX_CONCURRENCY = (1, 64)
RAW_ONNX_BATCHES = (1, 32)
# Its CPU engines that run here: its optimum (ONNX) engine needs optimum 1.x, whose exporter does not
# import under torch 2.13 (the Makefile's INFINITY_VENV says more).
INFINITY_ENGINES = ("torch",)
INFINITY_CONCURRENCY = 64
INFINITY_START_S = 300.0  # it loads, compiles and warms the model up before /health answers
DEFAULT_INFINITY = REPO / ".venv-bench" / "infinity" / "bin" / "infinity_emb"

MIXED_BATCHES = (8, 16, 32)
MIXED_CONCURRENCY = (64,)
MIXED_TEXTS_COUNT = 64
# A fixed list of varied ~10-word sentences (13-20 tokens with [CLS]/[SEP]). Natural text rather than random
# words so that lengths vary a little, as real traffic does, while every run sends the same bytes.
SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog near the river.",
    "Our quarterly revenue grew faster than analysts had expected this year.",
    "Please remember to water the tomato plants before leaving for work.",
    "The museum opens a new exhibition about ancient Roman glassware tomorrow.",
    "She solved the differential equation using a clever change of variables.",
    "Heavy rain is expected across the northern valleys later this evening.",
    "The new database index reduced our slowest query from minutes to seconds.",
    "Children gathered around the old storyteller sitting beside the warm fire.",
    "A balanced breakfast includes protein, whole grains, fruit, and some water.",
    "The orchestra rehearsed the second movement until well past midnight yesterday.",
    "Researchers found that sleep improves memory consolidation in young adults.",
    "Our flight to Lisbon was delayed by three hours due to fog.",
    "He carefully replaced the broken bicycle chain with a brand new one.",
    "The committee will vote on the revised budget proposal next Tuesday morning.",
    "Fresh bread from the corner bakery smells wonderful early in the morning.",
    "Kubernetes restarts the container automatically whenever its health check fails.",
    "The hikers reached the mountain summit just before the sun went down.",
    "Customer support answered every question politely and resolved my billing issue.",
    "Electric cars are becoming cheaper as battery production costs keep falling.",
    "My grandmother's apple pie recipe uses cinnamon, nutmeg, and brown sugar.",
    "The detective noticed a faint muddy footprint beneath the library window.",
    "Learning a second language changes how you think about your first.",
    "The satellite transmitted high resolution images of the melting polar ice.",
    "Remember to back up your laptop before installing the operating system update.",
    "A small cafe on the harbor serves the best grilled sardines in town.",
    "The striker scored twice in the final ten minutes of the match.",
    "Volunteers planted two hundred oak trees along the edge of the park.",
    "The contract must be signed by both parties before the end of March.",
    "Jazz musicians often improvise melodies over a familiar sequence of chords.",
    "The toddler giggled every time the puppy licked his tiny bare toes.",
    "Solar panels on the school roof now supply most of its electricity.",
    "The translator struggled to capture the poem's playful rhymes in English.",
)


# -- (a) raw in-process torch ----------------------------------------------------------------------
class RawEncoder:
    """Fast tokenizer + AutoModel forward + masked mean pooling: what the mesh does, with no mesh."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel

        self.torch = torch
        torch.set_num_threads(RAW_THREADS)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The shipped tokenizer.json pads to a fixed 128 tokens; pad to the longest text of the batch
        # instead, as the preprocess service does (that padding would cost ~10x the compute).
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0, pad_token="[PAD]")
        self.tokenizer.enable_truncation(max_length=max_length)
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return pooled.numpy()


def batch_of(size: int, start: int, texts: tuple[str, ...] = SENTENCES) -> list[str]:
    """`size` texts from a fixed list (the sentences), starting at `start` and wrapping around."""
    return [texts[(start + k) % len(texts)] for k in range(size)]


def mixed_texts() -> tuple[str, ...]:
    """(f)'s texts: 1-5 consecutive sentences joined (13-73 tokens), the same on every run."""
    import random

    rng = random.Random(0)
    joined = []
    for start in range(MIXED_TEXTS_COUNT):
        count = rng.randint(1, 5)
        joined.append(" ".join(SENTENCES[(start + k) % len(SENTENCES)] for k in range(count)))
    return tuple(joined)


MIXED_TEXTS = mixed_texts()


def raw_point(encode: Callable[[list[str]], np.ndarray], batch: int, texts: tuple[str, ...] = SENTENCES) -> dict:
    """Back-to-back batches: warm-up, then a window bounded by time and by batch count."""
    return time_batches(lambda step: encode(batch_of(batch, step * batch, texts)), batch, rate_key="sentences_per_s")


def bench_raw(
    encode: Callable[[list[str]], np.ndarray],
    batches: tuple[int, ...] = RAW_BATCHES,
    texts: tuple[str, ...] = SENTENCES,
) -> dict[str, Any]:
    points = []
    for batch in batches:
        point = raw_point(encode, batch, texts)
        points.append(point)
        print(
            f"  batch {batch:>2}: {point['sentences_per_s']:7.1f} sentences/s  p50 {point['p50_ms']} ms  "
            f"foreign {point['cpu']['foreign_cores']} cores",
            flush=True,
        )
    best = max(points, key=lambda p: p["sentences_per_s"])
    batch1 = next((p for p in points if p["batch"] == 1), None)
    return {
        "threads": RAW_THREADS,
        "points": points,
        "limit_sentences_per_s": best["sentences_per_s"],
        "limit_batch": best["batch"],
        "batch1_p50_ms": batch1["p50_ms"] if batch1 else None,
    }


class RawOnnxEncoder:
    """(a'): the tokenizer of (a), then the catalog's onnx engine in process: the graph the mesh
    serves with runtime_engine onnx (exported into the model store on first use), RAW_THREADS threads."""

    def __init__(self, encoder: RawEncoder, model_dir: Path, cache_dir: Path) -> None:
        from services.inference.runtime import RuntimeOptions, load_runtime

        self.tokenizer = encoder.tokenizer
        self.runtime = load_runtime("sentence_embedding", model_dir, RuntimeOptions("onnx", RAW_THREADS, cache_dir))

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return self.runtime.execute({"input_ids": ids, "attention_mask": mask})["embedding"]


async def sweep(
    name: str, call: Call, probe: Probe, concurrencies: tuple[int, ...] = CONCURRENCY
) -> list[dict[str, Any]]:
    points = []
    for concurrency in concurrencies:
        point = await closed_loop(call, concurrency, probe)
        points.append(point)
        print(
            f"  {name} c={concurrency:>2}: {point['rps']:7.1f} req/s  p50 {point['p50_ms']} ms  "
            f"p99 {point['p99_ms']} ms  avg batch {point['model_stats']['avg_batch']}  errors {point['errors']}  "
            f"foreign {point['cpu']['foreign_cores']} cores",
            flush=True,
        )
    return points


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- (b) the inference service alone over gRPC -----------------------------------------------------
async def bench_inference(
    target: str, model_name: str, encoder: RawEncoder, probe: Probe
) -> tuple[list[dict[str, Any]], float]:
    """Raw grpc.aio stubs (no tritonclient wrapper: it costs ~0.27 ms of client CPU per call) with
    requests built before the loop, so the client spends its time sending, not encoding."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    # Tokenized once, before the loop: one sentence per request, shape [1, T] at its own length T
    # (padding "to the longest" of a single text adds nothing).
    requests = []
    for text in SENTENCES:
        enc = encoder.tokenizer.encode(text)
        request = service_pb2.ModelInferRequest(model_name=model_name)
        for name, values in (("input_ids", enc.ids), ("attention_mask", enc.attention_mask)):
            request.inputs.add(name=name, datatype="INT64", shape=[1, len(values)])
            request.raw_input_contents.append(np.asarray([values], dtype="<i8").tobytes())
        requests.append(request)

    from services.common import service_auth

    interceptors = service_auth.client_interceptors(probe.service_token)
    async with grpc.aio.insecure_channel(target, interceptors=interceptors) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # One checked call first: the service must compute what (a) computes, or the ratio is meaningless.
        reply = await stub.ModelInfer(requests[0], timeout=REQUEST_TIMEOUT_S)
        served = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
        agreement = cosine(served, encoder.encode([SENTENCES[0]])[0])

        async def call(index: int) -> None:
            await stub.ModelInfer(requests[index % len(requests)], timeout=REQUEST_TIMEOUT_S)

        return await sweep("gRPC", call, probe), agreement


# -- (c) the full mesh over REST -------------------------------------------------------------------
async def bench_mesh(
    url: str,
    encoder: RawEncoder,
    probe: Probe,
    concurrencies: tuple[int, ...] = CONCURRENCY,
    name: str = "REST",
    texts: tuple[str, ...] = SENTENCES,
) -> tuple[list[dict[str, Any]], float]:
    """aiohttp: cheaper per request than httpx, so the 2-core box spends less on the client."""
    import aiohttp

    bodies = [json.dumps({"model": MODEL_ID, "input": text}).encode() for text in texts]
    endpoint = url + "/v1/embeddings"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=max(CONCURRENCY))  # one keep-alive connection per worker
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        async with session.post(endpoint, data=bodies[0]) as reply:
            reply.raise_for_status()
            served = np.asarray((await reply.json())["data"][0]["embedding"], dtype=np.float32)
        agreement = cosine(served, encoder.encode([texts[0]])[0])

        async def call(index: int) -> None:
            async with session.post(endpoint, data=bodies[index % len(bodies)]) as reply:
                body = await reply.read()
                if reply.status != 200:
                    raise HttpStatusError(f"{reply.status} {body[:120]!r}")

        return await sweep(name, call, probe, concurrencies), agreement


async def bench_services(mesh: Mesh, model_name: str, encoder: RawEncoder) -> dict[str, Any]:
    probe = Probe(mesh.inference_target, model_name, mesh.process.pid, mesh.service_token)
    try:
        print("(b) inference service alone, KServe v2 ModelInfer over gRPC", flush=True)
        grpc_points, grpc_cos = await bench_inference(mesh.inference_target, model_name, encoder, probe)
        print("(c) full mesh, POST /v1/embeddings", flush=True)
        rest_points, rest_cos = await bench_mesh(mesh.url, encoder, probe)
        mixed_points, mixed_cos = await bench_mixed_mesh(mesh, encoder, probe, "chunked")
    finally:
        await probe.close()
    return {
        "inference_grpc": grpc_points,
        "mesh_rest": rest_points,
        "mesh_rest_mixed_chunked": mixed_points,
        "check_cosine_vs_raw": {
            "inference_grpc": round(grpc_cos, 6),
            "mesh_rest": round(rest_cos, 6),
            "mesh_rest_mixed_chunked": round(mixed_cos, 6),
        },
    }


async def bench_mixed_mesh(mesh: Mesh, encoder: RawEncoder, probe: Probe, batches: str) -> tuple[list, float]:
    """(f): the mixed-length texts at MIXED_CONCURRENCY through the mesh's /v1/embeddings."""
    print(f"(f) full mesh, texts of 1-5 sentences, batches {batches}, POST /v1/embeddings", flush=True)
    return await bench_mesh(mesh.url, encoder, probe, MIXED_CONCURRENCY, f"REST mixed {batches}", MIXED_TEXTS)


async def bench_whole_batches(mesh: Mesh, model_name: str, encoder: RawEncoder) -> tuple[list, float]:
    probe = Probe(mesh.inference_target, model_name, mesh.process.pid, mesh.service_token)
    try:
        return await bench_mixed_mesh(mesh, encoder, probe, "whole")
    finally:
        await probe.close()


# -- (d) the full mesh with runtime_engine onnx -------------------------------------------------------
def onnx_catalog(folder: Path) -> Path:
    """The shipped catalog with the benched entry on runtime_engine onnx (the others as they are).
    Its torch layout (instances, threads) goes with torch: an onnx entry that sets neither runs the
    catalog's ONNX layout (services/common/catalog.py ONNX_LAYOUT, 2 single-thread instances)."""
    return catalog_with(folder, "onnx", {"runtime_engine": "onnx"}, drop=("instances", "threads"))


def catalog_with(folder: Path, name: str, inference: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """The shipped catalog with the benched entry's inference fields changed (the others as they are)."""
    import yaml

    data = yaml.safe_load((REPO / "catalog.yaml").read_text())
    for entry in data["models"]:
        if entry["id"] == MODEL_ID:
            entry["inference"].update(inference)
            for key in drop:
                entry["inference"].pop(key, None)
    path = folder / f"catalog-{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def bench_onnx_mesh(mesh: Mesh, model_name: str, encoder: RawEncoder) -> tuple[list[dict[str, Any]], float]:
    probe = Probe(mesh.inference_target, model_name, mesh.process.pid, mesh.service_token)
    try:
        print("(d) full mesh with runtime_engine onnx, POST /v1/embeddings", flush=True)
        return await bench_mesh(mesh.url, encoder, probe, ONNX_CONCURRENCY, "REST onnx")
    finally:
        await probe.close()


def run_mesh(tmp: Path, extra_env: dict[str, str], bench) -> Any:
    """Start a mesh, run `bench(mesh)` (a coroutine function) on uvloop, stop the mesh."""
    import uvloop  # the client shares the 2 cores with the mesh, so its per-request CPU matters

    mesh = start_mesh(tmp, extra_env)
    try:
        return uvloop.run(bench(mesh))
    except BaseException:
        print(f"mesh log tail:\n{mesh.log()[-3000:]}", file=sys.stderr)
        raise
    finally:
        mesh.stop()


# -- (e) infinity-emb on the same weights -------------------------------------------------------------
class ProcessProbe:
    """The Probe interface for a server that has no KServe statistics: CPU of its process tree only."""

    def __init__(self, pid: int) -> None:
        self.mesh_pid = pid

    async def sample(self):
        return ModelStats(0, 0, 0, 0, 0, 0), cpu_sample(self.mesh_pid)


def start_infinity(command: Path, model_dir: Path, engine: str, port: int, log: Path) -> subprocess.Popen:
    """`infinity_emb v2` on loopback, batch 32 like the catalog, waited for until /health answers."""
    import httpx

    args = [str(command), "v2", "--model-id", str(model_dir), "--served-model-name", MODEL_ID,
            "--engine", engine, "--device", "cpu", "--no-bettertransformer", "--batch-size", "32", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    deadline = time.monotonic() + INFINITY_START_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process(process)
    raise RuntimeError(f"infinity_emb ({engine}) did not start: {log.read_text()[-1500:]}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def bench_infinity_engine(url: str, pid: int, encoder: RawEncoder) -> tuple[dict[str, Any], float]:
    import aiohttp

    bodies = [json.dumps({"model": MODEL_ID, "input": [text]}).encode() for text in SENTENCES]
    connector = aiohttp.TCPConnector(limit=INFINITY_CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        async with session.post(url + "/embeddings", data=bodies[0]) as reply:
            reply.raise_for_status()
            served = np.asarray((await reply.json())["data"][0]["embedding"], dtype=np.float32)

        async def call(index: int) -> None:
            async with session.post(url + "/embeddings", data=bodies[index % len(bodies)]) as reply:
                body = await reply.read()
                if reply.status != 200:
                    raise HttpStatusError(f"{reply.status} {body[:120]!r}")

        point = await closed_loop(call, INFINITY_CONCURRENCY, ProcessProbe(pid))
    return point, cosine(served, encoder.encode([SENTENCES[0]])[0])


def bench_infinity(command: Path | None, model_dir: Path, encoder: RawEncoder, tmp: Path) -> dict[str, Any]:
    """Each CPU engine of infinity-emb at c=64 on the same weights; best_rps is the best engine's."""
    import uvloop

    if command is None or not command.exists():
        return {"skipped": f"no infinity_emb command at {command} (make bench-infinity-venv)"}
    result: dict[str, Any] = {"command": str(command), "engines": {}}
    for engine in INFINITY_ENGINES:
        print(f"(e) infinity-emb, engine {engine}, c={INFINITY_CONCURRENCY}", flush=True)
        port = free_port()
        try:
            process = start_infinity(command, model_dir, engine, port, tmp / f"infinity-{engine}.log")
        except RuntimeError as exc:
            result["engines"][engine] = {"error": str(exc)[-600:]}
            print(f"  {engine}: did not start", flush=True)
            continue
        try:
            point, agreement = uvloop.run(bench_infinity_engine(f"http://127.0.0.1:{port}", process.pid, encoder))
        finally:
            stop_process(process)
        point["check_cosine_vs_raw"] = round(agreement, 6)
        result["engines"][engine] = point
        print(f"  {engine} c={INFINITY_CONCURRENCY}: {point['rps']:7.1f} req/s  p50 {point['p50_ms']} ms  "
              f"errors {point['errors']}  cosine vs raw {agreement:.6f}", flush=True)  # fmt: skip
    measured = {k: v for k, v in result["engines"].items() if "rps" in v and v["requests"]}
    if measured:
        result["best_engine"] = max(measured, key=lambda k: measured[k]["rps"])
        result["best_rps"] = measured[result["best_engine"]]["rps"]
    return result


def add_ratios(points: list[dict[str, Any]], raw: dict[str, Any]) -> None:
    for p in points:
        p["ratio_to_raw_limit"] = round(p["rps"] / raw["limit_sentences_per_s"], 3)
        if p["concurrency"] == 1 and p["p50_ms"] is not None:
            p["p50_minus_raw_batch1_p50_ms"] = round(p["p50_ms"] - raw["batch1_p50_ms"], 2)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = result["raw"]
    series = (
        ("inference_grpc", "(b) inference service, gRPC"),
        ("mesh_rest", "(c) full mesh, REST"),
        ("mesh_rest_onnx", "(d) full mesh, REST, runtime_engine onnx"),
    )
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in series:
        points = result[key]
        xs = [p["concurrency"] for p in points]
        tput.plot(xs, [p["rps"] for p in points], marker="o", label=label)
        lat.plot(xs, [p["p50_ms"] for p in points], marker="o", label=label)
        for p in points:  # each point's share of the raw limit, next to it
            xy = (p["concurrency"], p["rps"])
            tput.annotate(
                f"{p['ratio_to_raw_limit']:.2f}x", xy, fontsize=7, textcoords="offset points", xytext=(4, -10)
            )
    limit, batch1 = raw["limit_sentences_per_s"], raw["batch1_p50_ms"]
    tput.axhline(
        limit, color="black", linestyle="--", label=f"(a) raw torch limit {limit:.0f}/s (batch {raw['limit_batch']})"
    )
    lat.axhline(batch1, color="black", linestyle="--", label=f"(a) raw batch-1 p50 {batch1:.1f} ms")
    onnx_limit = result["raw_onnx"]["limit_sentences_per_s"]
    tput.axhline(onnx_limit, color="gray", linestyle=":", label=f"(a') raw onnxruntime limit {onnx_limit:.0f}/s")
    best = result["infinity_emb"].get("best_rps")
    if best:
        engine = result["infinity_emb"]["best_engine"]
        tput.scatter([INFINITY_CONCURRENCY], [best], marker="x", color="red", zorder=3,
                     label=f"(e) infinity-emb ({engine}) {best:.0f}/s")  # fmt: skip
    for ax, title, ylabel in (
        (tput, "Throughput", "requests/s (1 sentence each)"),
        (lat, "Median latency", "p50 latency, ms (log)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent requests (closed loop)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    tput.set_ylim(bottom=0)
    lat.set_yscale("log")
    finish_figure(fig, path, result, result["model"])


def summary(result: dict[str, Any]) -> str:
    raw = result["raw"]
    lines = [
        f"**raw limit** {raw['limit_sentences_per_s']} sentences/s (batch {raw['limit_batch']}, "
        f"{raw['threads']} threads); **raw batch-1 p50** {raw['batch1_p50_ms']} ms",
        "",
        "| path | batch / c | req/s | x raw limit | p50 ms | p90 ms | p99 ms | Δp50 vs raw b1 ms | errors | avg batch | foreign cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, section in (("(a) raw torch", raw), ("(a') raw onnxruntime", result["raw_onnx"])):
        for p in section["points"]:
            ratio = p["sentences_per_s"] / raw["limit_sentences_per_s"]
            lines.append(
                f"| {label} | b={p['batch']} | {p['sentences_per_s']} | {ratio:.2f} | {p['p50_ms']} | "
                f"{p['p90_ms']} | {p['p99_ms']} | | 0 | {p['batch']} | {p['cpu']['foreign_cores']} |"
            )
    paths = (
        ("inference_grpc", "(b) inference gRPC"),
        ("mesh_rest", "(c) mesh REST"),
        ("mesh_rest_onnx", "(d) mesh REST, onnx"),
    )
    for key, name in paths:
        for p in result[key]:
            delta = p.get("p50_minus_raw_batch1_p50_ms", "")
            lines.append(
                f"| {name} | c={p['concurrency']} | {p['rps']} | {p['ratio_to_raw_limit']:.2f} | {p['p50_ms']} | "
                f"{p['p90_ms']} | {p['p99_ms']} | {delta} | {p['errors']} | {p['model_stats']['avg_batch']} | "
                f"{p['cpu']['foreign_cores']} |"
            )
    lines += infinity_rows(result["infinity_emb"], raw)
    lines += mixed_rows(result)
    if result["noisy_points"]:
        lines += ["", noisy_warning(result["noisy_points"])]
    return "\n".join(lines)


def infinity_rows(infinity: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    if "skipped" in infinity:
        return ["", f"(e) infinity-emb: not measured: {infinity['skipped']}"]
    rows = []
    for engine, p in infinity["engines"].items():
        if "rps" not in p:
            rows.append(f"| (e) infinity-emb {engine} | c={INFINITY_CONCURRENCY} | did not start | | | | | | | | |")
            continue
        rows.append(
            f"| (e) infinity-emb {engine} | c={p['concurrency']} | {p['rps']} | "
            f"{p['rps'] / raw['limit_sentences_per_s']:.2f} | {p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} | | "
            f"{p['errors']} | | {p['cpu']['foreign_cores']} |"
        )
    return rows


def mixed_rows(result: dict[str, Any]) -> list[str]:
    """(f): texts of 1-5 sentences, each ratio to raw's best padded batch on the same texts."""
    raw = result["raw_mixed"]
    lines = [
        "",
        f"(f) texts of 1-5 sentences: **raw limit** {raw['limit_sentences_per_s']} sentences/s (padded batch "
        f"{raw['limit_batch']})",
        "",
        "| path | batch / c | req/s | x raw limit | p50 ms | p99 ms | errors | avg batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in raw["points"]:
        ratio = p["sentences_per_s"] / raw["limit_sentences_per_s"]
        lines.append(f"| (f) raw torch, padded | b={p['batch']} | {p['sentences_per_s']} | {ratio:.2f} | {p['p50_ms']} | "
                     f"{p['p99_ms']} | 0 | {p['batch']} |")  # fmt: skip
    for key, name in (("mesh_rest_mixed_chunked", "(f) mesh, chunked"), ("mesh_rest_mixed_whole", "(f) mesh, whole")):
        for p in result[key]:
            lines.append(
                f"| {name} | c={p['concurrency']} | {p['rps']} | {p['ratio_to_raw_limit']:.2f} | {p['p50_ms']} | "
                f"{p['p99_ms']} | {p['errors']} | {p['model_stats']['avg_batch']} |"
            )
    return lines


def noisy_points(result: dict[str, Any]) -> int:
    infinity = [p for p in result["infinity_emb"].get("engines", {}).values() if "cpu" in p]
    points = [*result["raw"]["points"], *result["raw_onnx"]["points"], *result["inference_grpc"], *result["mesh_rest"]]
    points += [*result["mesh_rest_onnx"], *infinity, *result["raw_mixed"]["points"]]
    points += [*result["mesh_rest_mixed_chunked"], *result["mesh_rest_mixed_whole"]]
    return count_noisy(points)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run_embeddings", description=__doc__.split("\n")[0])
    parser.add_argument("--infinity", type=lambda p: Path(p).resolve() if p else None, default=DEFAULT_INFINITY,
                        help="infinity-emb's `infinity_emb` command ('' skips infinity-emb)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of embeddings.json and .png")
    return parser.parse_args(argv)


def bench_meshes(tmp: Path, entry, encoder: RawEncoder) -> dict[str, Any]:
    """(b) and (c) on the shipped catalog, then (d) on a mesh whose entry runs on onnx."""
    name = entry.inference.name
    (tmp / "torch").mkdir()
    services = run_mesh(tmp / "torch", {}, lambda mesh: bench_services(mesh, name, encoder))
    (tmp / "onnx").mkdir()
    env = {"MESHSERVE_CATALOG": str(onnx_catalog(tmp))}
    onnx_points, onnx_cos = run_mesh(tmp / "onnx", env, lambda mesh: bench_onnx_mesh(mesh, name, encoder))
    services["mesh_rest_onnx"] = onnx_points
    services["check_cosine_vs_raw"]["mesh_rest_onnx"] = round(onnx_cos, 6)
    (tmp / "whole").mkdir()
    env = {"MESHSERVE_CATALOG": str(catalog_with(tmp, "whole", {"chunk_rows": 0}))}
    whole_points, whole_cos = run_mesh(tmp / "whole", env, lambda mesh: bench_whole_batches(mesh, name, encoder))
    services["mesh_rest_mixed_whole"] = whole_points
    services["check_cosine_vs_raw"]["mesh_rest_mixed_whole"] = round(whole_cos, 6)
    return services


def run_config(encoder: RawEncoder) -> dict[str, Any]:
    token_counts = [len(encoder.tokenizer.encode(s).ids) for s in SENTENCES]
    mixed_counts = [len(encoder.tokenizer.encode(s).ids) for s in MIXED_TEXTS]
    return {
        "mixed_texts": len(MIXED_TEXTS),
        "tokens_per_mixed_text": {"min": min(mixed_counts), "max": max(mixed_counts)},
        "mixed_batches": list(MIXED_BATCHES),
        "bench_seconds": SECONDS,
        "warmup_s": WARMUP_S,
        "max_requests_per_point": MAX_REQUESTS,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "concurrency": list(CONCURRENCY),
        "onnx_concurrency": list(ONNX_CONCURRENCY),
        "raw_batches": list(RAW_BATCHES),
        "raw_onnx_batches": list(RAW_ONNX_BATCHES),
        "sentences": len(SENTENCES),
        "tokens_per_sentence": {"min": min(token_counts), "max": max(token_counts)},
        "grpc_client": "grpc.aio + raw KServe v2 stubs, one channel, uvloop",
        "rest_client": f"aiohttp, pool of {max(CONCURRENCY)} keep-alive connections, uvloop",
    }


def main(argv: list[str] | None = None) -> int:
    from services.common.catalog import Catalog
    from services.inference.runtime import RuntimeOptions

    args = parse_args(argv)
    if SECONDS <= 0:
        sys.exit("BENCH_SECONDS must be > 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    entry = Catalog.load(REPO / "catalog.yaml").get(MODEL_ID)
    model_dir = meshserve_home() / "models" / MODEL_ID / "model"
    if not (model_dir / "tokenizer.json").exists():
        sys.exit(f"{model_dir} is missing; run `meshserve models build` (or `make models`) first")

    started = time.time()
    info = machine_info()
    print(f"(a) raw in-process torch, {RAW_THREADS} threads, {WARMUP_S:g}+{SECONDS:g} s per batch size", flush=True)
    encoder = RawEncoder(model_dir, entry.preprocess.max_length)
    # Before the mesh starts, so the raw limit is measured with nothing else of ours on the cores.
    raw = bench_raw(encoder.encode)
    print(f"(a') raw in-process onnxruntime (the onnx engine's graph), {RAW_THREADS} threads", flush=True)
    cache_dir = RuntimeOptions.of(entry, meshserve_home() / "models").cache_dir
    raw_onnx = bench_raw(RawOnnxEncoder(encoder, model_dir, cache_dir).encode, RAW_ONNX_BATCHES)
    print(f"(f) raw in-process torch, texts of 1-5 sentences, padded batches, {RAW_THREADS} threads", flush=True)
    raw_mixed = bench_raw(encoder.encode, MIXED_BATCHES, MIXED_TEXTS)

    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as tmp:
        services = bench_meshes(Path(tmp), entry, encoder)
        infinity = bench_infinity(args.infinity, model_dir, encoder, Path(tmp))

    for key in ("inference_grpc", "mesh_rest", "mesh_rest_onnx"):
        add_ratios(services[key], raw)
    for key in ("mesh_rest_mixed_chunked", "mesh_rest_mixed_whole"):
        add_ratios(services[key], raw_mixed)
    for p in services["mesh_rest_onnx"]:
        p["ratio_to_raw_onnx_limit"] = round(p["rps"] / raw_onnx["limit_sentences_per_s"], 3)
    result = {
        "benchmark": "embeddings",
        "model": MODEL_ID,
        "inference_model": entry.inference.name,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "git": git_info(),
        "machine": info,
        "config": run_config(encoder),
        "catalog_inference": entry.inference.model_dump(mode="json"),
        "raw": raw,
        "raw_onnx": raw_onnx,
        "raw_mixed": raw_mixed,
        **services,
        "infinity_emb": infinity,
    }
    result["noisy_points"] = noisy_points(result)
    write_results(args.results, "embeddings", result, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

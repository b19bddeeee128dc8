"""Embeddings benchmark, in one run on this machine, one sentence per request (all-MiniLM-L6-v2):

  (a) raw in-process torch at batch 1/8/16/32: the physical limit of this box,
  (b) the inference service alone: KServe v2 ModelInfer over gRPC at concurrency 1/16/64,
  (c) the full mesh: POST /v1/embeddings (gateway -> preprocess -> inference -> postprocess) at 1/16/64.

Every (b)/(c) point is also given as a ratio to (a)'s limit from the same run, so runs on different
days or machines compare by ratio, not by absolute numbers. Writes bench/results/embeddings.json and
bench/results/embeddings.png and prints a markdown summary.

    python -m bench.run_embeddings                   # BENCH_SECONDS=8 per point (about 2.5 minutes)
    BENCH_SECONDS=2 python -m bench.run_embeddings   # smoke run
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
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
    Probe,
    closed_loop,
    count_noisy,
    finish_figure,
    git_info,
    machine_info,
    noisy_warning,
    time_batches,
    write_results,
)
from tests.helpers import MODEL_ID, Mesh, meshserve_home, start_mesh

CONCURRENCY = (1, 16, 64)
RAW_BATCHES = (1, 8, 16, 32)
RAW_THREADS = 2  # the machine has 2 cores; perf-baselines.md §2 measured the ceiling at 2 threads

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


def batch_of(size: int, start: int) -> list[str]:
    """`size` sentences from the fixed list, starting at `start` and wrapping around."""
    return [SENTENCES[(start + k) % len(SENTENCES)] for k in range(size)]


def raw_point(encoder: RawEncoder, batch: int) -> dict[str, Any]:
    """Back-to-back batches: warm-up, then a window bounded by time and by batch count."""
    return time_batches(lambda step: encoder.encode(batch_of(batch, step * batch)), batch, rate_key="sentences_per_s")


def bench_raw(encoder: RawEncoder) -> dict[str, Any]:
    points = []
    for batch in RAW_BATCHES:
        point = raw_point(encoder, batch)
        points.append(point)
        print(
            f"  batch {batch:>2}: {point['sentences_per_s']:7.1f} sentences/s  p50 {point['p50_ms']} ms  "
            f"foreign {point['cpu']['foreign_cores']} cores",
            flush=True,
        )
    best = max(points, key=lambda p: p["sentences_per_s"])
    batch1 = next(p for p in points if p["batch"] == 1)
    return {
        "threads": RAW_THREADS,
        "points": points,
        "limit_sentences_per_s": best["sentences_per_s"],
        "limit_batch": best["batch"],
        "batch1_p50_ms": batch1["p50_ms"],
    }


async def sweep(name: str, call: Call, probe: Probe) -> list[dict[str, Any]]:
    points = []
    for concurrency in CONCURRENCY:
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
async def bench_mesh(url: str, encoder: RawEncoder, probe: Probe) -> tuple[list[dict[str, Any]], float]:
    """aiohttp: cheaper per request than httpx, so the 2-core box spends less on the client."""
    import aiohttp

    bodies = [json.dumps({"model": MODEL_ID, "input": text}).encode() for text in SENTENCES]
    endpoint = url + "/v1/embeddings"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=max(CONCURRENCY))  # one keep-alive connection per worker
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        async with session.post(endpoint, data=bodies[0]) as reply:
            reply.raise_for_status()
            served = np.asarray((await reply.json())["data"][0]["embedding"], dtype=np.float32)
        agreement = cosine(served, encoder.encode([SENTENCES[0]])[0])

        async def call(index: int) -> None:
            async with session.post(endpoint, data=bodies[index % len(bodies)]) as reply:
                body = await reply.read()
                if reply.status != 200:
                    raise HttpStatusError(f"{reply.status} {body[:120]!r}")

        return await sweep("REST", call, probe), agreement


async def bench_services(mesh: Mesh, model_name: str, encoder: RawEncoder) -> dict[str, Any]:
    probe = Probe(mesh.inference_target, model_name, mesh.process.pid, mesh.service_token)
    try:
        print("(b) inference service alone, KServe v2 ModelInfer over gRPC", flush=True)
        grpc_points, grpc_cos = await bench_inference(mesh.inference_target, model_name, encoder, probe)
        print("(c) full mesh, POST /v1/embeddings", flush=True)
        rest_points, rest_cos = await bench_mesh(mesh.url, encoder, probe)
    finally:
        await probe.close()
    return {
        "inference_grpc": grpc_points,
        "mesh_rest": rest_points,
        "check_cosine_vs_raw": {"inference_grpc": round(grpc_cos, 6), "mesh_rest": round(rest_cos, 6)},
    }


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
    series = (("inference_grpc", "(b) inference service, gRPC"), ("mesh_rest", "(c) full mesh, REST"))
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
    for p in raw["points"]:
        ratio = p["sentences_per_s"] / raw["limit_sentences_per_s"]
        lines.append(
            f"| (a) raw torch | b={p['batch']} | {p['sentences_per_s']} | {ratio:.2f} | {p['p50_ms']} | "
            f"{p['p90_ms']} | {p['p99_ms']} | | 0 | {p['batch']} | {p['cpu']['foreign_cores']} |"
        )
    for key, name in (("inference_grpc", "(b) inference gRPC"), ("mesh_rest", "(c) mesh REST")):
        for p in result[key]:
            delta = p.get("p50_minus_raw_batch1_p50_ms", "")
            lines.append(
                f"| {name} | c={p['concurrency']} | {p['rps']} | {p['ratio_to_raw_limit']:.2f} | {p['p50_ms']} | "
                f"{p['p90_ms']} | {p['p99_ms']} | {delta} | {p['errors']} | {p['model_stats']['avg_batch']} | "
                f"{p['cpu']['foreign_cores']} |"
            )
    if result["noisy_points"]:
        lines += ["", noisy_warning(result["noisy_points"])]
    return "\n".join(lines)


def noisy_points(result: dict[str, Any]) -> int:
    points = [*result["raw"]["points"], *result["inference_grpc"], *result["mesh_rest"]]
    return count_noisy(points)


def main() -> int:
    from services.common.catalog import Catalog

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
    raw = bench_raw(encoder)

    print("starting the mesh (meshserve up)", flush=True)
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as tmp:
        mesh = start_mesh(Path(tmp))
        try:
            # uvloop: the client shares the 2 cores with the mesh, so its per-request CPU matters.
            import uvloop

            services = uvloop.run(bench_services(mesh, entry.inference.name, encoder))
        except BaseException:
            print(f"mesh log tail:\n{mesh.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            mesh.stop()

    add_ratios(services["inference_grpc"], raw)
    add_ratios(services["mesh_rest"], raw)
    token_counts = [len(encoder.tokenizer.encode(s).ids) for s in SENTENCES]
    result = {
        "benchmark": "embeddings",
        "model": MODEL_ID,
        "inference_model": entry.inference.name,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "git": git_info(),
        "machine": info,
        "config": {
            "bench_seconds": SECONDS,
            "warmup_s": WARMUP_S,
            "max_requests_per_point": MAX_REQUESTS,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "concurrency": list(CONCURRENCY),
            "raw_batches": list(RAW_BATCHES),
            "sentences": len(SENTENCES),
            "tokens_per_sentence": {"min": min(token_counts), "max": max(token_counts)},
            "grpc_client": "grpc.aio + raw KServe v2 stubs, one channel, uvloop",
            "rest_client": f"aiohttp, pool of {max(CONCURRENCY)} keep-alive connections, uvloop",
        },
        "catalog_inference": entry.inference.model_dump(mode="json"),
        "raw": raw,
        **services,
    }
    result["noisy_points"] = noisy_points(result)
    write_results(RESULTS, "embeddings", result, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

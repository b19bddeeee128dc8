"""Users' own model folders through the mesh, in one run on this machine, one text per request:

  embedder    a BGE-style sentence-transformers folder (bench/user_folders.py: BERT 12 layers, hidden 384,
              CLS pooling + Normalize), routes: HF feature-extraction (POST /models/<id>) and /v1/embeddings
  classifier  a BertForSequenceClassification folder (6 layers, hidden 384, 3 labels), route: HF
              text-classification (POST /models/<id>)

  raw   the same folder in this process with the library users load it with (SentenceTransformer.encode;
        AutoTokenizer + AutoModelForSequenceClassification forward + softmax), tokenization included, the
        inference service's torch thread count, at batch 1 (latency floor) and batch 32; the raw limit is
        batch 32's rate measured just before and just after the model's mesh points (mean of the two),
        with the mesh up and idle, so that both sides of the ratio see the same shared machine
  mesh  `meshserve up --model ID=PATH` for each folder (the entries services.models.from_folder infers),
        concurrency 1 and 64, every HF request with X-Use-Cache: false;
        per point req/s, p50/p99, the ratio to the raw limit and the CPU milliseconds per request of
        each service (psutil at the window's edges)

Texts: the sentences the repository ships (services/models/data/sentiment.tsv), cycled, the same order
for raw and mesh. Issue #16's target: the mesh at c=64 >= 0.80 of the raw limit. Writes
bench/results/user_models.{json,png} and prints a markdown summary.

    python -m bench.run_user_models                 # 8 s per point (BENCH_SECONDS), about 4 minutes
    python -m bench.run_user_models --seconds 2     # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import (
    MAX_REQUESTS,
    REQUEST_TIMEOUT_S,
    RESULTS,
    SECONDS,
    WARMUP_S,
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
from tests.helpers import Mesh, start_mesh

CONCURRENCY = (1, 64)
RAW_BATCHES = (1, 32)  # batch 1: the latency floor; batch 32 (the catalog's max_batch_size): the raw limit
LIMIT_BATCH = 32
TARGET_RATIO = 0.80  # issue #16: the mesh at c=64 reaches this share of the raw limit
CHECK_INPUTS = 8  # texts sent once per route and compared with the raw library's answer
EMBEDDER = "bench/bge-style-embedder"
CLASSIFIER = "bench/bert-classifier"


def texts() -> list[str]:
    from services.models.builders import sentiment

    return [text for text, _ in sentiment.load()]


# -- the folders, and the `meshserve up --model` arguments that serve them ---------------------------
def build_folders() -> dict[str, Path]:
    from bench import user_folders
    from tests.usermodels.factory import built

    return {EMBEDDER: built(EMBEDDER, user_folders.embedder), CLASSIFIER: built(CLASSIFIER, user_folders.classifier)}


def served_entries(folders: dict[str, Path]) -> tuple[list[str], dict[str, Any]]:
    """`meshserve up` arguments that serve the folders (--model ID=PATH), and the entries `up` infers
    from them (services.models.user_models.infer, the same call): their threads, labels, tensors."""
    from services.models.user_models import infer

    specs = [f"{model_id}={folder}" for model_id, folder in folders.items()]
    entries = {model_id: infer(spec).entry for model_id, spec in zip(folders, specs, strict=True)}
    return [arg for spec in specs for arg in ("--model", spec)], entries


# -- raw: the folder in this process, with the library users load it with ---------------------------
@dataclass
class Model:
    """One user folder under test: how this process runs a batch of texts, and its mesh routes."""

    id: str
    folder: Path
    entry: Any  # services.common.catalog.ModelEntry
    run: Callable[[list[str]], np.ndarray]  # texts -> embeddings (normalized) or class probabilities
    library: str
    routes: list[Route] = field(default_factory=list)


@dataclass
class Route:
    name: str
    path: str  # relative to the gateway's URL
    body: Callable[[str], dict[str, Any]]
    answer: Callable[[Any], np.ndarray]  # reply JSON -> vector / probabilities in label order
    headers: dict[str, str] = field(default_factory=dict)


def sentence_transformer(folder: Path) -> Callable[[list[str]], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return lambda batch: model.encode(batch, batch_size=LIMIT_BATCH, convert_to_numpy=True)


def sequence_classifier(folder: Path) -> Callable[[list[str]], np.ndarray]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()

    def run(batch: list[str]) -> np.ndarray:
        encoded = tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            return torch.softmax(model(**encoded).logits, dim=-1).numpy()

    return run


def raw_points(model: Model, items: list[str], sizes: tuple[int, ...], seconds: float) -> list[dict[str, Any]]:
    """Back-to-back batches of `sizes` texts (bench.common.time_batches), tokenization included."""
    from services.inference.runtime import set_torch_threads

    set_torch_threads(model.entry.inference.threads)  # what the inference service sets for this model

    def batch(size: int, step: int) -> list[str]:
        return [items[(step * size + k) % len(items)] for k in range(size)]

    points = []
    for size in sizes:
        point = time_batches(lambda step, size=size: model.run(batch(size, step)), size, seconds=seconds)
        cpu = point["cpu"]["client_cores"] * point["seconds"]
        point["cpu_ms_per_item"] = round(cpu * 1000 / max(point["batches"] * size, 1), 3)
        points.append(point)
        print(
            f"  raw batch {size:>2}: {point['items_per_s']:7.1f} texts/s  p50 {point['p50_ms']} ms  "
            f"foreign {point['cpu']['foreign_cores']} cores",
            flush=True,
        )
    return points


def raw_summary(model: Model, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """The raw limit: batch 32's rate, the mean of the measurements before and after the model's mesh
    points (the cores are shared: a limit measured minutes away from the mesh points drifts)."""
    limits = [p["items_per_s"] for p in (*before, *after) if p["batch"] == LIMIT_BATCH]
    return {
        "library": model.library,
        "threads": model.entry.inference.threads,
        "points": before,
        "points_after_mesh": after,
        "limit_items_per_s": round(float(np.mean(limits)), 1),
        "limit_runs_items_per_s": limits,
        "limit_batch": LIMIT_BATCH,
        "batch1_p50_ms": next(p for p in before if p["batch"] == 1)["p50_ms"],
    }


# -- mesh: REST routes, CPU per request per service --------------------------------------------------
def service_cpu_s(root_pid: int) -> dict[str, float]:
    """CPU seconds of each process of the mesh, by service (services.<name>.main), the rest as 'other'."""
    out: dict[str, float] = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for proc in procs:
        try:
            cmdline = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:
            continue
        name = "supervisor" if proc.pid == root_pid else "other"
        for service in ("gateway", "preprocess", "inference", "postprocess"):
            if f"services.{service}.main" in cmdline:
                name = service
        out[name] = out.get(name, 0.0) + times.user + times.system
    return out


class ServiceProbe(Probe):
    """Probe that also takes each service's CPU seconds at the window's edges (closed_loop samples twice)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.edges: list[dict[str, float]] = []

    async def sample(self):
        sampled = await super().sample()
        self.edges.append(service_cpu_s(self.mesh_pid))
        return sampled

    def cpu_ms_per_request(self, requests: int) -> dict[str, float]:
        before, after = self.edges[-2], self.edges[-1]
        return {k: round((after[k] - before.get(k, 0.0)) * 1000 / max(requests, 1), 3) for k in sorted(after)}


def embedder_routes(model_id: str) -> list[Route]:
    nocache = {"X-Use-Cache": "false"}
    return [
        Route(
            "HF feature-extraction",
            f"/models/{model_id}",
            lambda text: {"inputs": text},
            lambda reply: np.asarray(reply, dtype=np.float32).reshape(-1),
            nocache,
        ),
        Route(
            "/v1/embeddings",
            "/v1/embeddings",
            lambda text: {"model": model_id, "input": text},
            lambda reply: np.asarray(reply["data"][0]["embedding"], dtype=np.float32),
        ),
    ]


def classifier_routes(model_id: str, labels: list[str]) -> list[Route]:
    def probabilities(reply: Any) -> np.ndarray:
        scores = {item["label"]: item["score"] for item in (reply[0] if isinstance(reply[0], list) else reply)}
        return np.asarray([scores.get(label, np.nan) for label in labels], dtype=np.float64)

    return [
        Route(
            "HF text-classification",
            f"/models/{model_id}",
            lambda text: {"inputs": text, "parameters": {"top_k": len(labels)}},  # every label: checkable
            probabilities,
            {"X-Use-Cache": "false"},
        )
    ]


async def check_route(session: Any, url: str, model: Model, route: Route, items: list[str]) -> dict[str, Any]:
    """CHECK_INPUTS texts once through the route (waiting for a cold model) against the raw library."""
    headers = {**route.headers, "X-Wait-For-Model": "true"}
    worst_cos, worst_diff, top_agrees = 1.0, 0.0, 0
    for text in items[:CHECK_INPUTS]:
        async with session.post(url + route.path, json=route.body(text), headers=headers) as reply:
            body = await reply.read()
            if reply.status != 200:
                raise HttpStatusError(f"{route.path}: {reply.status} {body[:200]!r}")
        served, raw = route.answer(json.loads(body)), model.run([text])[0]
        if served.shape != raw.shape:
            raise HttpStatusError(f"{route.path}: answer of shape {served.shape}, raw {raw.shape}")
        cosine = float(np.dot(served, raw) / (np.linalg.norm(served) * np.linalg.norm(raw)))
        worst_cos, worst_diff = min(worst_cos, cosine), max(worst_diff, float(np.max(np.abs(served - raw))))
        top_agrees += int(np.argmax(served) == np.argmax(raw))
    return {
        "inputs": min(CHECK_INPUTS, len(items)),
        "min_cosine": round(worst_cos, 6),
        "max_abs_diff": worst_diff,
        "argmax_agrees": top_agrees,
    }


async def route_point(session, url, route: Route, items, concurrency, probe, seconds) -> dict[str, Any]:
    bodies = [json.dumps(route.body(text)).encode() for text in items]
    headers = {"Content-Type": "application/json", **route.headers}

    async def call(index: int) -> None:
        async with session.post(url + route.path, data=bodies[index % len(bodies)], headers=headers) as reply:
            body = await reply.read()
            if reply.status != 200:
                raise HttpStatusError(f"{reply.status} {body[:120]!r}")

    point = await closed_loop(call, concurrency, probe, seconds=seconds)
    point["cpu_ms_per_request"] = probe.cpu_ms_per_request(point["requests"])
    print(
        f"  {route.name:<24} c={concurrency:<3} {point['rps']:7.1f} req/s  p50 {point['p50_ms']} ms  "
        f"p99 {point['p99_ms']} ms  avg batch {point['model_stats']['avg_batch']}  errors {point['errors']}  "
        f"cpu ms/req {point['cpu_ms_per_request']}  foreign {point['cpu']['foreign_cores']} cores",
        flush=True,
    )
    return point


async def bench_mesh(mesh: Mesh, model: Model, items: list[str], seconds: float) -> dict[str, Any]:
    """One model's routes. aiohttp, one keep-alive pool of 64, uvloop: the client shares the cores."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=max(CONCURRENCY))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    out: dict[str, Any] = {}
    probe = ServiceProbe(mesh.inference_target, model.entry.inference.name, mesh.process.pid, mesh.service_token)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for route in model.routes:
                print(f"(mesh) {model.id}: POST {route.path} ({route.name})", flush=True)
                check = await check_route(session, mesh.url, model, route, items)
                print(f"  check vs raw: {check}", flush=True)
                points = [await route_point(session, mesh.url, route, items, c, probe, seconds) for c in CONCURRENCY]
                out[route.name] = {
                    "endpoint": f"POST {route.path}",
                    "headers": route.headers,
                    "check_vs_raw": check,
                    "points": points,
                }
    finally:
        await probe.close()
    return out


def bench_model(mesh: Mesh, model: Model, items: list[str], seconds: float) -> tuple[dict, dict]:
    """Raw batch 1 and 32, the mesh's routes, raw batch 32 again: (raw summary, routes)."""
    import uvloop

    print(f"(raw) {model.id}: {model.library}, {WARMUP_S:g}+{seconds:g} s per batch size", flush=True)
    before = raw_points(model, items, RAW_BATCHES, seconds)
    routes = uvloop.run(bench_mesh(mesh, model, items, seconds))
    print(f"(raw) {model.id} again, after its mesh points", flush=True)
    after = raw_points(model, items, (LIMIT_BATCH,), seconds)
    return raw_summary(model, before, after), routes


# -- output --------------------------------------------------------------------------------------
def add_ratios(result: dict[str, Any]) -> None:
    for data in result["models"].values():
        raw = data["raw"]
        for route in data["routes"].values():
            for p in route["points"]:
                p["ratio_to_raw_limit"] = round(p["rps"] / raw["limit_items_per_s"], 3)
                if p["concurrency"] == 1 and p["p50_ms"] is not None:
                    p["p50_minus_raw_batch1_p50_ms"] = round(p["p50_ms"] - raw["batch1_p50_ms"], 2)
            top = max(route["points"], key=lambda p: p["concurrency"])
            route["meets_target"] = top["ratio_to_raw_limit"] >= TARGET_RATIO


def all_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    points = []
    for data in result["models"].values():
        points += data["raw"]["points"] + data["raw"]["points_after_mesh"]
        for route in data["routes"].values():
            points += route["points"]
    return points


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(6.2 * len(models), 8.0), squeeze=False)
    for col, (model_id, data) in enumerate(models.items()):
        raw, tput, lat = data["raw"], axes[0][col], axes[1][col]
        for name, route in data["routes"].items():
            xs = [p["concurrency"] for p in route["points"]]
            tput.plot(xs, [p["rps"] for p in route["points"]], marker="o", label=f"mesh {name}")
            lat.plot(xs, [p["p50_ms"] for p in route["points"]], marker="o", label=f"{name} p50")
            lat.plot(xs, [p["p99_ms"] for p in route["points"]], marker="s", linestyle=":", label=f"{name} p99")
            for p in route["points"]:
                tput.annotate(
                    f"{p['ratio_to_raw_limit']:.2f}x",
                    (p["concurrency"], p["rps"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, -10),
                )
        limit = raw["limit_items_per_s"]
        tput.axhline(limit, color="black", linestyle="--", label=f"raw limit {limit:.0f}/s ({raw['library']}, b=32)")
        tput.axhline(TARGET_RATIO * limit, color="tab:red", linestyle=":", label=f"target {TARGET_RATIO:.2f}x raw")
        lat.axhline(raw["batch1_p50_ms"], color="black", linestyle="--", label=f"raw b=1 p50 {raw['batch1_p50_ms']} ms")
        for ax, what, ylabel in ((tput, "throughput", "requests/s, 1 text each"), (lat, "latency", "ms (log)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
            ax.set_xlabel("concurrent requests (closed loop)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model_id} ({data['runtime']}): {what}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        tput.set_ylim(bottom=0)
        lat.set_yscale("log")
    finish_figure(fig, path, result, "users' model folders through the mesh", "; labels: ratio to raw limit")


def summary(result: dict[str, Any]) -> str:
    lines = []
    for model_id, data in result["models"].items():
        raw = data["raw"]
        lines += [
            f"**{model_id}** ({data['runtime']}; {data['shape']}): raw limit {raw['limit_items_per_s']} texts/s "
            f"({raw['library']}, batch {LIMIT_BATCH}, {raw['threads']} threads, mean of {raw['limit_runs_items_per_s']}); raw batch-1 p50 {raw['batch1_p50_ms']} ms",
            "",
            "| path | b / c | req/s | x raw | p50 ms | p99 ms | errors | avg batch | CPU ms/req by service | foreign cores |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, p in [
            *(("raw in-process", p) for p in raw["points"]),
            *(("raw, after mesh", p) for p in raw["points_after_mesh"]),
        ]:
            lines.append(
                f"| {label} | b={p['batch']} | {p['items_per_s']} | "
                f"{p['items_per_s'] / raw['limit_items_per_s']:.2f} | {p['p50_ms']} | {p['p99_ms']} | 0 | {p['batch']} | "
                f"{p['cpu_ms_per_item']} (this process) | {p['cpu']['foreign_cores']} |"
            )
        for name, route in data["routes"].items():
            for p in route["points"]:
                cpu = ", ".join(f"{k} {v}" for k, v in p["cpu_ms_per_request"].items() if v >= 0.005)
                lines.append(
                    f"| {name} | c={p['concurrency']} | {p['rps']} | {p['ratio_to_raw_limit']:.2f} | {p['p50_ms']} | "
                    f"{p['p99_ms']} | {p['errors']} | {p['model_stats']['avg_batch']} | {cpu} | "
                    f"{p['cpu']['foreign_cores']} |"
                )
            check = route["check_vs_raw"]
            lines.append(
                f"| {name}: check vs raw | {check['inputs']} texts | min cosine {check['min_cosine']} | "
                f"max abs diff {check['max_abs_diff']:.2e} | | | | | | |"
            )
        lines.append("")
    if result["noisy_points"]:
        lines.append(noisy_warning(result["noisy_points"]))
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------
def make_models(entries: dict[str, Any], folders: dict[str, Path]) -> list[Model]:
    """The folders as Models (the mesh serves copies of them), each with its raw runner and routes."""
    models = []
    if EMBEDDER in entries:
        folder = folders[EMBEDDER]
        run = sentence_transformer(folder)
        models.append(Model(EMBEDDER, folder, entries[EMBEDDER], run, "SentenceTransformer.encode"))
        models[-1].routes = embedder_routes(EMBEDDER)
    if CLASSIFIER in entries:
        folder, entry = folders[CLASSIFIER], entries[CLASSIFIER]
        run = sequence_classifier(folder)
        library = "AutoModelForSequenceClassification forward + softmax"
        models.append(Model(CLASSIFIER, folder, entry, run, library))
        models[-1].routes = classifier_routes(CLASSIFIER, list(entry.postprocess.labels))
    return models


def model_results(models: list[Model], raws: dict[str, Any], meshes: dict[str, Any]) -> dict[str, Any]:
    shapes = {
        EMBEDDER: "BERT 12 layers, hidden 384, CLS + Normalize",
        CLASSIFIER: "BERT 6 layers, hidden 384, 3 labels",
    }
    return {
        m.id: {
            "runtime": m.entry.inference.runtime,
            "shape": shapes[m.id],
            "folder": str(m.folder),
            "catalog_inference": m.entry.inference.model_dump(mode="json"),
            "raw": raws[m.id],
            "routes": meshes.get(m.id, {}),
        }
        for m in models
    }


def run(seconds: float, home: Path, tmp: Path) -> dict[str, Any]:
    folders = build_folders()
    up_args, entries = served_entries(folders)
    models = make_models(entries, folders)
    items = texts()
    print(f"starting the mesh: meshserve up {' '.join(up_args)}", flush=True)
    home.mkdir(parents=True, exist_ok=True)  # its own: `up --model` writes home/run/catalog.yaml
    mesh = start_mesh(tmp, home=home, args=up_args)
    raws, meshes = {}, {}
    try:
        for model in models:
            raws[model.id], meshes[model.id] = bench_model(mesh, model, items, seconds)
    except BaseException:
        print(f"mesh log tail:\n{mesh.log()[-3000:]}", file=sys.stderr)
        raise
    finally:
        mesh.stop()
    return {"models": model_results(models, raws, meshes), "meshserve_up": up_args, "texts": len(items)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_user_models", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=SECONDS, help="window per point (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for user_models.{json,png}")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    started = time.time()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-users-") as tmp:
        measured = run(args.seconds, Path(tmp) / "home", Path(tmp))
    result = {
        "benchmark": "user_models",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "git": git_info(),
        "machine": info,
        "config": {
            "bench_seconds": args.seconds,
            "warmup_s": WARMUP_S,
            "max_requests_per_point": MAX_REQUESTS,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "concurrency": list(CONCURRENCY),
            "raw_batches": list(RAW_BATCHES),
            "target_ratio_at_c64": TARGET_RATIO,
            "texts": "services/models/data/sentiment.tsv, all splits, cycled",
            # Raw and mesh inherit it: on a shared machine a run under `nice -n -10` keeps most of the
            # cores for both sides of the ratio (README: users' models).
            "nice": os.nice(0),
            "rest_client": f"aiohttp, pool of {max(CONCURRENCY)} keep-alive connections, uvloop",
        },
        **measured,
    }
    add_ratios(result)
    result["noisy_points"] = count_noisy(all_points(result))
    result["duration_s"] = round(time.time() - started, 1)
    write_results(args.out, "user_models", result, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

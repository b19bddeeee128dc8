"""Classification benchmark, in one run on this machine, one input per request (HF task API):

  text   meshserve/sentiment-minilm  POST /models/meshserve/sentiment-minilm  {"inputs": "<sentence>"}
  image  meshserve/digits-cnn        POST /models/meshserve/digits-cnn        <raw PNG bytes>

  (a) raw in-process: the model's runtime class (services.inference.runtime.load_runtime) called
      directly with torch, on all the threads the catalog gives the model (instances x threads), at
      batch 1 and at each of the catalog's preferred batch sizes; each batch is prepared the way
      preprocess does (tokenize / decode the PNG).
      raw limit = best items/s over the preferred sizes; raw batch-1 p50 = the latency floor.
  (c) the full mesh (gateway -> preprocess -> inference -> postprocess) at concurrency 1/16/64, every
      request with `X-Use-Cache: false` so the gateway's HF response cache is bypassed; plus one point
      "c=64 cached" without the header, labelled as such, to show what the cache does.

Every mesh point is also given as a ratio to (a)'s limit of the same model from the same run. Writes
bench/results/classification.json and bench/results/classification.png and prints a markdown summary.

    python -m bench.run_classification               # 6 s per point (BENCH_SECONDS if set), ~3 minutes
    python -m bench.run_classification --seconds 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    MAX_RAW_BATCHES,
    MAX_REQUESTS,
    REPO,
    REQUEST_TIMEOUT_S,
    RESULTS,
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
from bench.run_embeddings import CONCURRENCY
from tests.helpers import Mesh, meshserve_home, start_mesh

DEFAULT_SECONDS = float(os.environ.get("BENCH_SECONDS", "6"))  # per point; 6 keeps a run near 3 minutes
CACHED_CONCURRENCY = 64  # the one extra point with the response cache on
CHECK_INPUTS = 32  # inputs sent once through the mesh and compared with the raw runtime's answer
TEXT_MODEL = "meshserve/sentiment-minilm"
IMAGE_MODEL = "meshserve/digits-cnn"


@dataclass
class Task:
    """One model under test: its inputs, how preprocess turns them into tensors, its REST bodies."""

    task: str  # HF task name, the key in the results
    entry: Any  # services.common.catalog.ModelEntry
    runtime: Any  # services.inference.runtime.Runtime
    unit: str  # what one input is: "sentences" or "images"
    items: list[Any]  # sentences (str) or PNG bytes, sent in this order, wrapping around
    expected: list[str]  # the data set's label of each item
    prepare: Callable[[list[Any]], dict[str, np.ndarray]]  # items -> runtime inputs, as preprocess does
    bodies: list[bytes]
    content_type: str
    input_note: dict[str, Any] = field(default_factory=dict)

    def batch(self, size: int, start: int) -> list[Any]:
        return [self.items[(start + k) % len(self.items)] for k in range(size)]

    def run_raw(self, size: int, step: int) -> np.ndarray:
        return self.runtime.execute(self.prepare(self.batch(size, step * size)))["logits"]


def text_task(entry: Any, runtime: Any, folder: Path) -> Task:
    from tokenizers import Tokenizer

    from services.models.builders import sentiment

    # As preprocess does (services/preprocess/core.py): the catalog's truncation, and padding reset from
    # the shipped tokenizer.json's fixed 128 tokens to the longest text of the batch.
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=entry.preprocess.max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0, pad_token="[PAD]")

    def prepare(texts: list[str]) -> dict[str, np.ndarray]:
        encodings = tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    pairs = sentiment.load("test")
    texts = [text for text, _ in pairs]
    tokens = [len(tokenizer.encode(t).ids) for t in texts]
    return Task(
        task="text-classification",
        entry=entry,
        runtime=runtime,
        unit="sentences",
        items=texts,
        expected=[label for _, label in pairs],
        prepare=prepare,
        bodies=[json.dumps({"inputs": text}).encode() for text in texts],
        content_type="application/json",
        input_note={
            "source": "services.models.builders.sentiment.load('test')",
            "count": len(texts),
            "tokens_per_sentence": {"min": min(tokens), "max": max(tokens), "mean": round(float(np.mean(tokens)), 1)},
        },
    )


def image_task(entry: Any, runtime: Any) -> Task:
    from services.common import images
    from services.models.builders import digits

    _, _, held_out, labels = digits.split()
    pngs = [digits.render_png(image) for image in held_out]
    spec, name = entry.preprocess.image, entry.inference.inputs[0].name

    def prepare(data: list[bytes]) -> dict[str, np.ndarray]:
        return {name: np.stack([images.decode(png, spec) for png in data]).astype(np.float32)}

    sizes = [len(png) for png in pngs]
    return Task(
        task="image-classification",
        entry=entry,
        runtime=runtime,
        unit="images",
        items=pngs,
        expected=[str(int(label)) for label in labels],
        prepare=prepare,
        bodies=pngs,
        content_type="image/png",
        input_note={
            "source": "services.models.builders.digits.split() held-out digits, digits.render_png",
            "count": len(pngs),
            "png_bytes": {"min": min(sizes), "max": max(sizes)},
            "shape": [1, spec.height, spec.width],
        },
    )


# -- (a) raw in-process runtime --------------------------------------------------------------------
def raw_sizes(entry: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(every batch size measured, the sizes the limit is taken over: the catalog's preferred sizes)."""
    preferred = tuple(entry.inference.preferred_batch_sizes) or (entry.inference.max_batch_size,)
    return tuple(sorted({1, *preferred})), preferred


def raw_point(task: Task, batch: int, seconds: float) -> dict[str, Any]:
    return time_batches(lambda step: task.run_raw(batch, step), batch, seconds=seconds)


def bench_raw(task: Task, seconds: float) -> dict[str, Any]:
    from services.inference.runtime import set_torch_threads

    spec = task.entry.inference
    # Every thread the inference service gives this model, in one: its lone batch runs on them all
    # (services/inference/batcher.py), and raw in-process at batch 1 must not be handicapped.
    threads = spec.instances * spec.threads
    set_torch_threads(threads)
    sizes, preferred = raw_sizes(task.entry)
    points = []
    for batch in sizes:
        point = raw_point(task, batch, seconds)
        points.append(point)
        print(
            f"  {task.task} batch {batch:>2}: {point['items_per_s']:8.1f} {task.unit}/s  p50 {point['p50_ms']} ms  "
            f"foreign {point['cpu']['foreign_cores']} cores",
            flush=True,
        )
    best = max((p for p in points if p["batch"] in preferred), key=lambda p: p["items_per_s"])
    batch1 = next(p for p in points if p["batch"] == 1)
    return {
        "threads": threads,
        "runtime": task.entry.inference.runtime,
        "measures": "preprocess's input preparation (tokenize / PNG decode) + runtime.execute, in this process",
        "preferred_batch_sizes": list(preferred),
        "points": points,
        "limit_items_per_s": best["items_per_s"],
        "limit_batch": best["batch"],
        "batch1_p50_ms": batch1["p50_ms"],
    }


# -- (c) the full mesh over REST -------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def top_of(reply: Any) -> tuple[str, float]:
    """The best label of one input's HF answer: [[{label, score}...]] (text) or [{label, score}...]."""
    labels = reply[0] if reply and isinstance(reply[0], list) else reply
    best = max(labels, key=lambda item: item["score"])
    return str(best["label"]), float(best["score"])


async def check_vs_raw(session: Any, endpoint: str, task: Task) -> dict[str, Any]:
    """CHECK_INPUTS inputs once through the mesh (waiting for a cold model, cache bypassed) against the
    raw runtime at batch 1: the mesh must compute what (a) computes, or the ratio means nothing."""
    headers = {"Content-Type": task.content_type, "X-Use-Cache": "false", "X-Wait-For-Model": "true"}
    labels = list(task.entry.postprocess.labels)
    agree = correct = 0
    worst = 0.0
    count = min(CHECK_INPUTS, len(task.items))
    for i in range(count):
        async with session.post(endpoint, data=task.bodies[i], headers=headers) as reply:
            body = await reply.read()
            if reply.status != 200:
                raise HttpStatusError(f"{endpoint}: {reply.status} {body[:200]!r}")
        label, score = top_of(json.loads(body))
        probs = softmax(task.runtime.execute(task.prepare([task.items[i]]))["logits"][0].astype(np.float64))
        raw_label = labels[int(np.argmax(probs))]
        agree += label == raw_label
        correct += label == task.expected[i]
        worst = max(worst, abs(score - float(probs.max())))
    return {
        "inputs": count,
        "top_label_agrees_with_raw": agree,
        "max_abs_top_score_diff": round(worst, 6),
        "mesh_top_label_correct": correct,
    }


async def mesh_point(
    session: Any, endpoint: str, task: Task, concurrency: int, probe: Probe, seconds: float, *, use_cache: bool
) -> dict[str, Any]:
    headers = {"Content-Type": task.content_type}
    if not use_cache:
        headers["X-Use-Cache"] = "false"
    x_cache: Counter[str] = Counter()  # the gateway's X-Cache answer: BYPASS, MISS or HIT

    async def call(index: int) -> None:
        async with session.post(endpoint, data=task.bodies[index % len(task.bodies)], headers=headers) as reply:
            body = await reply.read()
            if reply.status != 200:
                raise HttpStatusError(f"{reply.status} {body[:120]!r}")
            x_cache[reply.headers.get("X-Cache", "absent")] += 1

    point = await closed_loop(call, concurrency, probe, seconds=seconds)
    point["use_cache"] = use_cache
    point["x_cache_incl_warmup"] = dict(x_cache)
    label = f"c={concurrency}" + (" cached" if use_cache else "")
    print(
        f"  {task.task} {label:<10} {point['rps']:7.1f} req/s  p50 {point['p50_ms']} ms  p99 {point['p99_ms']} ms  "
        f"avg batch {point['model_stats']['avg_batch']}  errors {point['errors']}  X-Cache {dict(x_cache)}  "
        f"foreign {point['cpu']['foreign_cores']} cores  µs CPU/req gw/pre/inf/post/client {hop_costs(point)}",
        flush=True,
    )
    return point


async def bench_mesh(mesh: Mesh, tasks: list[Task], seconds: float) -> dict[str, dict[str, Any]]:
    """aiohttp, one keep-alive pool of 64 for both tasks (as run_embeddings)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=max(CONCURRENCY))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    out: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for task in tasks:
            endpoint = f"{mesh.url}/models/{task.entry.id}"
            probe = Probe(mesh.inference_target, task.entry.inference.name, mesh.process.pid, mesh.service_token)
            try:
                print(f"(c) full mesh, POST /models/{task.entry.id} (X-Use-Cache: false)", flush=True)
                check = await check_vs_raw(session, endpoint, task)
                print(f"  check vs raw: {check}", flush=True)
                points = [
                    await mesh_point(session, endpoint, task, c, probe, seconds, use_cache=False) for c in CONCURRENCY
                ]
                cached = await mesh_point(session, endpoint, task, CACHED_CONCURRENCY, probe, seconds, use_cache=True)
            finally:
                await probe.close()
            out[task.task] = {"mesh_rest": points, "mesh_rest_cached": cached, "check_vs_raw": check}
    return out


def add_ratios(points: list[dict[str, Any]], raw: dict[str, Any]) -> None:
    for p in points:
        p["ratio_to_raw_limit"] = round(p["rps"] / raw["limit_items_per_s"], 4)
        if p["concurrency"] == 1 and not p.get("use_cache") and p["p50_ms"] is not None:
            p["p50_minus_raw_batch1_p50_ms"] = round(p["p50_ms"] - raw["batch1_p50_ms"], 2)


# -- output ----------------------------------------------------------------------------------------
def all_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    points = []
    for data in result["tasks"].values():
        points += [*data["raw"]["points"], *data["mesh_rest"], data["mesh_rest_cached"]]
    return points


def noisy_points(result: dict[str, Any]) -> int:
    return count_noisy(all_points(result))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.2 * len(tasks), 8.5), squeeze=False)
    for col, (name, data) in enumerate(tasks.items()):
        raw, points, cached = data["raw"], data["mesh_rest"], data["mesh_rest_cached"]
        xs = [p["concurrency"] for p in points]
        tput, lat = axes[0][col], axes[1][col]
        tput.plot(xs, [p["rps"] for p in points], marker="o", label="full mesh, X-Use-Cache: false")
        for p in points:
            xy = (p["concurrency"], p["rps"])
            tput.annotate(
                f"{p['ratio_to_raw_limit']:.3g}x", xy, fontsize=7, textcoords="offset points", xytext=(4, -10)
            )
        tput.plot(
            [cached["concurrency"]],
            [cached["rps"]],
            marker="*",
            markersize=11,
            linestyle="none",
            color="tab:green",
            label=f"c={cached['concurrency']} cached (response cache on, {cached['ratio_to_raw_limit']:.3g}x)",
        )
        limit = raw["limit_items_per_s"]
        tput.axhline(
            limit,
            color="black",
            linestyle="--",
            label=f"raw in-process limit {limit:.0f}/s (batch {raw['limit_batch']}, {raw['threads']} thr)",
        )
        lat.plot(xs, [p["p50_ms"] for p in points], marker="o", label="full mesh p50")
        lat.plot(xs, [p["p99_ms"] for p in points], marker="s", linestyle=":", label="full mesh p99")
        lat.plot(
            [cached["concurrency"]],
            [cached["p50_ms"]],
            marker="*",
            markersize=11,
            linestyle="none",
            color="tab:green",
            label=f"c={cached['concurrency']} cached p50",
        )
        lat.axhline(
            raw["batch1_p50_ms"], color="black", linestyle="--", label=f"raw batch-1 p50 {raw['batch1_p50_ms']} ms"
        )
        for ax, title, ylabel in (
            (tput, f"{result['models'][name]} — throughput", "requests/s, 1 input each (log)"),
            (lat, f"{result['models'][name]} — latency", "latency, ms (log)"),
        ):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
            ax.set_xlabel("concurrent requests (closed loop)")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    finish_figure(fig, path, result, "classification through the mesh", "; labels: ratio to raw limit")


def hop_costs(point: dict[str, Any]) -> str:
    """The point's CPU per request in each service and the client, in microseconds."""
    cost = point.get("cpu_us_per_request")
    if not cost:
        return "-"
    return " / ".join(
        str(cost.get(name, "-")) for name in ("gateway", "preprocess", "inference", "postprocess", "client")
    )


def summary(result: dict[str, Any]) -> str:
    lines = []
    for name, data in result["tasks"].items():
        raw = data["raw"]
        lines += [
            f"**{result['models'][name]}** ({name}): raw limit {raw['limit_items_per_s']} items/s "
            f"(batch {raw['limit_batch']}, {raw['threads']} threads); raw batch-1 p50 {raw['batch1_p50_ms']} ms; "
            f"check vs raw {data['check_vs_raw']['top_label_agrees_with_raw']}/{data['check_vs_raw']['inputs']} "
            f"labels agree",
            "",
            "| path | batch / c | req/s | x raw limit | p50 ms | p99 ms | errors | avg batch "
            "| client / server / foreign cores | µs CPU per request: gateway / pre / inference / post / client |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in raw["points"]:
            lines.append(
                f"| raw in-process | b={p['batch']} | {p['items_per_s']} | "
                f"{p['items_per_s'] / raw['limit_items_per_s']:.2f} | {p['p50_ms']} | {p['p99_ms']} | 0 | "
                f"{p['batch']} | {p['cpu']['client_cores']} / - / {p['cpu']['foreign_cores']} | - |"
            )
        for p in [*data["mesh_rest"], data["mesh_rest_cached"]]:
            label = f"c={p['concurrency']}" + (" **cached**" if p["use_cache"] else "")
            cpu = p["cpu"]
            lines.append(
                f"| mesh REST | {label} | {p['rps']} | {p['ratio_to_raw_limit']:.3g} | {p['p50_ms']} | "
                f"{p['p99_ms']} | {p['errors']} | {p['model_stats']['avg_batch']} | "
                f"{cpu['client_cores']} / {cpu['server_cores']} / {cpu['foreign_cores']} | {hop_costs(p)} |"
            )
        lines.append("")
    if result["noisy_points"]:
        lines.append(noisy_warning(result["noisy_points"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from services.common.catalog import Catalog
    from services.common.modelstore import model_dir
    from services.inference.runtime import load_runtime

    parser = argparse.ArgumentParser(prog="python -m bench.run_classification", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help="measurement window per point (default %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for classification.{json,png} (default bench/results)"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    seconds = args.seconds
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    catalog = Catalog.load(REPO / "catalog.yaml")
    models_dir = meshserve_home() / "models"
    entries = {"text": catalog.get(TEXT_MODEL), "image": catalog.get(IMAGE_MODEL)}
    folders = {key: model_dir(entry, models_dir) for key, entry in entries.items()}
    for folder in folders.values():
        if not folder.is_dir():
            sys.exit(f"{folder} is missing; run `meshserve models build` (or `make models`) first")

    started = time.time()
    info = machine_info()
    runtimes = {key: load_runtime(entry.inference.runtime, folders[key]) for key, entry in entries.items()}
    tasks = [
        text_task(entries["text"], runtimes["text"], folders["text"]),
        image_task(entries["image"], runtimes["image"]),
    ]
    # Before the mesh starts, so the raw limits are measured with nothing else of ours on the cores.
    raws = {}
    for task in tasks:
        print(
            f"(a) raw in-process {task.entry.inference.runtime} ({task.entry.id}), {WARMUP_S:g}+{seconds:g} s per batch size",
            flush=True,
        )
        raws[task.task] = bench_raw(task, seconds)

    print("starting the mesh (meshserve up)", flush=True)
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as tmp:
        mesh = start_mesh(Path(tmp))
        try:
            # uvloop: the client shares the cores with the mesh, so its per-request CPU matters.
            import uvloop

            mesh_results = uvloop.run(bench_mesh(mesh, tasks, seconds))
        except BaseException:
            print(f"mesh log tail:\n{mesh.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            mesh.stop()

    results: dict[str, Any] = {}
    for task in tasks:
        raw, data = raws[task.task], mesh_results[task.task]
        add_ratios(data["mesh_rest"], raw)
        add_ratios([data["mesh_rest_cached"]], raw)
        results[task.task] = {
            "model": task.entry.id,
            "inference_model": task.entry.inference.name,
            "endpoint": f"POST /models/{task.entry.id}",
            "body": 'JSON {"inputs": sentence}' if task.unit == "sentences" else "raw PNG bytes",
            "inputs": task.input_note,
            "catalog_inference": task.entry.inference.model_dump(mode="json"),
            "raw": raw,
            **data,
        }
    result = {
        "benchmark": "classification",
        "models": {task.task: task.entry.id for task in tasks},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "git": git_info(),
        "machine": info,
        "config": {
            "bench_seconds": seconds,
            "warmup_s": WARMUP_S,
            "max_requests_per_point": MAX_REQUESTS,
            "max_raw_batches_per_point": MAX_RAW_BATCHES,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "concurrency": list(CONCURRENCY),
            "cached_point_concurrency": CACHED_CONCURRENCY,
            "cache": "every mesh_rest request sends X-Use-Cache: false; mesh_rest_cached sends no cache header",
            "rest_client": f"aiohttp, pool of {max(CONCURRENCY)} keep-alive connections, uvloop",
        },
        "tasks": results,
    }
    result["noisy_points"] = noisy_points(result)
    write_results(args.out, "classification", result, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embedded backend vs real Triton: the same model, machine and run, concurrency 1/16/64.

For each backend, `meshserve up --backend <b>` is started and measured like `run_embeddings`:
(b) the inference service alone (KServe v2 ModelInfer over gRPC) and (c) the full mesh over REST,
each as a ratio to (a), the raw in-process torch limit measured first in the same run.

    python -m bench.run_backends          # writes bench/results/backends.{json,png}
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, SECONDS, git_info, machine_info, save_figure, write_atomic
from bench.run_embeddings import CONCURRENCY, RAW_THREADS, RawEncoder, add_ratios, bench_raw, bench_services
from tests.helpers import MODEL_ID, REPO, TRITON_SUPPORTED, meshserve_home, start_mesh

BACKENDS = ("embedded", "triton") if TRITON_SUPPORTED else ("embedded",)


def run_backend(backend: str, model_name: str, encoder: RawEncoder) -> dict[str, Any]:
    import uvloop

    with tempfile.TemporaryDirectory(prefix=f"meshserve-bench-{backend}-") as tmp:
        mesh = start_mesh(Path(tmp), backend=backend)
        try:
            return uvloop.run(bench_services(mesh, model_name, encoder))
        except BaseException:
            print(f"mesh log tail:\n{mesh.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            mesh.stop()


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    limit = result["raw"]["limit_sentences_per_s"]
    for ax, key, title in zip(
        axes, ("inference_grpc", "mesh_rest"), ("inference service alone (gRPC)", "full mesh (REST)"), strict=True
    ):
        for backend, data in result["backends"].items():
            points = data[key]
            ax.plot([p["concurrency"] for p in points], [p["rps"] for p in points], marker="o", label=backend)
        ax.axhline(limit, color="grey", linestyle="--", label=f"raw torch limit ({limit:.0f}/s)")
        ax.axhline(0.9 * limit, color="grey", linestyle=":", label="90% of raw")
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent requests (1 sentence each)")
        ax.set_title(f"all-MiniLM-L6-v2 — {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("requests/s")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    from services.common.catalog import Catalog

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    entry = Catalog.load(REPO / "catalog.yaml").get(MODEL_ID)
    encoder = RawEncoder(meshserve_home() / "models" / MODEL_ID / "model", entry.preprocess.max_length)
    started = time.time()
    print(f"(a) raw in-process torch, {RAW_THREADS} threads", flush=True)
    raw = bench_raw(encoder)
    backends = {}
    for backend in BACKENDS:
        print(f"backend {backend}: meshserve up --backend {backend}", flush=True)
        backends[backend] = run_backend(backend, entry.inference.name, encoder)
        add_ratios(backends[backend]["inference_grpc"], raw)
        add_ratios(backends[backend]["mesh_rest"], raw)
    result = {
        "benchmark": "backends",
        "model": MODEL_ID,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "git": git_info(),
        "machine": machine_info(),
        "bench_seconds": SECONDS,
        "catalog_inference": entry.inference.model_dump(mode="json"),
        "raw": raw,
        "backends": backends,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "backends.json", (json.dumps(result, indent=2) + "\n").encode())
    plot(result, RESULTS / "backends.png")
    print(f"\nraw limit {raw['limit_sentences_per_s']}/s; raw batch-1 p50 {raw['batch1_p50_ms']} ms")
    print("| backend | path | c | req/s | x raw | p50 ms | p99 ms | avg batch |\n|---|---|---|---|---|---|---|---|")
    for backend, data in backends.items():
        for key in ("inference_grpc", "mesh_rest"):
            for p in data[key]:
                avg = (p.get("model_stats") or {}).get("avg_batch")
                print(
                    f"| {backend} | {key} | {p['concurrency']} | {p['rps']} | {p['ratio_to_raw_limit']} | "
                    f"{p['p50_ms']} | {p['p99_ms']} | {avg} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every performance target of the benchmarks, read from bench/results/*.json: its measured value,
its target and met / not met. `make bench` runs this last; `python -m bench.targets` any time.

A target whose result file (or point) is missing is listed as `not measured`, never as met.
The table is also written to bench/results/targets.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    goal: str
    met: bool | None  # None: not measured
    source: str


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _point(points: list[dict], key: str, value: int) -> dict | None:
    return next((p for p in points if p.get(key) == value), None)


def _at_least(name: str, value: float | None, goal: float, source: str, unit: str = "") -> Target:
    met = None if value is None else value >= goal
    return Target(name, value, f">= {goal:g}{unit}", met, source)


def _at_most(name: str, value: float | None, goal: float, source: str, unit: str = "") -> Target:
    met = None if value is None else value <= goal
    return Target(name, value, f"<= {goal:g}{unit}", met, source)


def _generation_model(section: dict | None, label: str, goal32: float, goal8: float | None) -> Iterator[Target]:
    points = (section or {}).get("mesh", {}).get("points", [])
    src = "generation.json"
    p32, p8 = _point(points, "concurrency", 32), _point(points, "concurrency", 8)
    yield _at_least(f"{label}: mesh / raw batched, 32 streams", p32 and p32.get("ratio_to_raw_batched_same_size"),
                    goal32, src)  # fmt: skip
    if goal8 is not None:
        yield _at_least(f"{label}: mesh / raw batched, 8 streams", p8 and p8.get("ratio_to_raw_batched_same_size"),
                        goal8, src)  # fmt: skip


def generation(results: Path) -> Iterator[Target]:
    data = _load(results, "generation")
    if data is None:
        yield Target("generation", None, "run bench.run_generation", None, "generation.json")
        return
    yield from _generation_model(data, "tiny LM", 0.70, 0.60)
    points = data.get("mesh", {}).get("points", [])
    p32, p1 = _point(points, "concurrency", 32), _point(points, "concurrency", 1)
    if p32 and p32.get("ttft"):
        ratio = p32["ttft"]["p99_ms"] / p32["ttft"]["p50_ms"]
        yield _at_most("tiny LM: TTFT p99 / p50, 32 streams", round(ratio, 2), 2.0, "generation.json")
    raw_step = next((r.get("step_ms_p50") for r in data.get("raw", {}).get("points", []) if r["batch"] == 1), None)
    if p1 and p1.get("itl") and raw_step is not None:
        excess = round(p1["itl"]["p50_ms"] - raw_step, 2)
        yield _at_most("tiny LM: 1-stream ITL p50 - raw step (ms)", excess, 1.0, "generation.json")
    base = data.get("base")
    if base is None:
        yield Target("base LM (~110M): mesh / raw batched, 32 streams", None, ">= 0.85", None, "generation.json")
    else:
        yield from _generation_model(base, "base LM (~110M)", 0.85, None)


def _mesh_targets(label: str, raw: dict, points: list[dict], source: str) -> Iterator[Target]:
    p64, p1 = _point(points, "concurrency", 64), _point(points, "concurrency", 1)
    yield _at_least(f"{label}: mesh / raw limit, c=64", p64 and p64.get("ratio_to_raw_limit"), 0.80, source)
    yield _at_most(f"{label}: mesh p50 - raw batch-1 p50, c=1 (ms)", p1 and p1.get("p50_minus_raw_batch1_p50_ms"),
                   3.0, source)  # fmt: skip


def embeddings(results: Path) -> Iterator[Target]:
    data = _load(results, "embeddings")
    if data is None:
        yield Target("embeddings", None, "run bench.run_embeddings", None, "embeddings.json")
        return
    yield from _mesh_targets("embeddings (torch)", data["raw"], data.get("mesh_rest", []), "embeddings.json")
    onnx = data.get("mesh_rest_onnx")
    if onnx is not None:
        p64 = _point(onnx, "concurrency", 64)
        yield _at_least("embeddings (ONNX): mesh / raw torch limit, c=64", p64 and p64.get("ratio_to_raw_limit"),
                        1.0, "embeddings.json")  # fmt: skip
    infinity = data.get("infinity_emb")
    if infinity and onnx:
        p64 = _point(onnx, "concurrency", 64)
        best = infinity.get("best_rps")
        value = round(p64["rps"] / best, 2) if p64 and best else None
        yield _at_least("embeddings (ONNX): mesh / infinity-emb, c=64", value, 1.0, "embeddings.json")


def classification(results: Path) -> Iterator[Target]:
    data = _load(results, "classification")
    if data is None:
        yield Target("classification", None, "run bench.run_classification", None, "classification.json")
        return
    text = data["tasks"].get("text-classification")
    if text:
        yield from _mesh_targets("text classification (torch)", text["raw"], text["mesh_rest"], "classification.json")
    image = data["tasks"].get("image-classification")
    if image:
        p64 = _point(image["mesh_rest"], "concurrency", 64)
        yield _at_least("digits CNN via REST, c=64 (req/s)", p64 and p64.get("rps"), 3000, "classification.json")


SECTIONS: tuple[Callable[[Path], Iterator[Target]], ...] = (generation, embeddings, classification)


def collect(results: Path = RESULTS) -> list[Target]:
    return [target for section in SECTIONS for target in section(results)]


def render(targets: list[Target]) -> str:
    width = max(len(t.name) for t in targets)
    lines = [f"{'target':<{width}}  {'measured':>9}  {'goal':<10}  result"]
    for t in targets:
        value = "-" if t.value is None else f"{t.value:g}"
        verdict = "not measured" if t.met is None else ("met" if t.met else "NOT MET")
        lines.append(f"{t.name:<{width}}  {value:>9}  {t.goal:<10}  {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    targets = collect(args.results)
    print(render(targets))
    out = args.results / "targets.json"
    out.write_text(json.dumps([asdict(t) for t in targets], indent=2) + "\n")


if __name__ == "__main__":
    main()

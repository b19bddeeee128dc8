"""gRPC server bootstrap: interceptors, health, reflection, graceful drain on SIGTERM.

`create_server()` is what every service's `main()` and every test fixture call, so tests run the
production interceptor chain: [tracing, metrics, error mapping] (outermost first, so telemetry sees
the final status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import deadlines, service_auth, tracing
from services.common.errors import DETAILS_KEY, ErrorCode, MeshError
from services.common.metrics import (
    CONVENTIONAL_HANDLED,
    CONVENTIONAL_SECONDS,
    CONVENTIONAL_STARTED,
    GRPC_HANDLED,
    GRPC_SECONDS,
)
from services.common.settings import GrpcServiceSettings

log = logging.getLogger(__name__)

UNKNOWN_METHOD = "unknown"  # the metrics label of every call to a method this server does not serve


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """Rebuild a method handler with its behavior wrapped (unary or server-streaming responses)."""
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )


async def _abort(context: grpc.aio.ServicerContext, err: MeshError) -> None:
    context.set_trailing_metadata(((DETAILS_KEY, err.to_status_details()),))
    await context.abort(err.code.grpc_code, err.message)


def _internal(method: str) -> MeshError:
    log.exception("unhandled error in %s", method)
    return MeshError(ErrorCode.INTERNAL, "internal error")


class Drain:
    """Counts calls in progress; once draining, new calls are refused with UNAVAILABLE.

    grpc's own `server.stop(grace)` cancels calls that reach the server after it began stopping
    (the caller sees CANCELLED); refusing them ourselves first gives callers a clean, retryable
    UNAVAILABLE while the calls already running finish.
    """

    def __init__(self) -> None:
        self.active = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.draining:
            raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, "server is shutting down; retry on another replica")
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """The one place where exceptions become gRPC statuses. Innermost in the chain.

    MeshError -> its code + google.rpc.Status details; anything else -> INTERNAL with a generic
    message (the traceback is logged, never sent). The caller's deadline is made visible to
    downstream clients of this service (deadlines shrink hop by hop). Calls are counted for the
    graceful drain.
    """

    def __init__(self, drain: Drain) -> None:
        self.drain = drain

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith("/grpc."):
            return handler  # health and reflection keep answering while draining
        drain = self.drain

        def wrap_unary(behavior):
            async def wrapper(request, context):
                token = deadlines.set_from_grpc(context)
                entered = False
                try:
                    drain.enter()
                    entered = True
                    return await behavior(request, context)
                except MeshError as err:
                    await _abort(context, err)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception:
                    await _abort(context, _internal(method))
                finally:
                    if entered:
                        drain.leave()
                    deadlines.reset(token)

            return wrapper

        def wrap_stream(behavior):
            async def wrapper(request, context):
                token = deadlines.set_from_grpc(context)
                entered = False
                try:
                    drain.enter()
                    entered = True
                    async for item in behavior(request, context):
                        yield item
                except MeshError as err:
                    await _abort(context, err)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception:
                    await _abort(context, _internal(method))
                finally:
                    if entered:
                        drain.leave()
                    deadlines.reset(token)

            return wrapper

        return _wrap_handler(handler, wrap_unary, wrap_stream)


class _MethodSeries:
    """The metric children of one method, looked up once (label lookups cost per call)."""

    __slots__ = ("conventional", "handled", "labels", "seconds", "started", "timing")

    def __init__(self, service: str, short: str, grpc_type: str, grpc_service: str, grpc_method: str) -> None:
        self.labels = (service, short)
        self.conventional = (grpc_type, grpc_service, grpc_method)
        self.started = CONVENTIONAL_STARTED.labels(*self.conventional)
        self.seconds = GRPC_SECONDS.labels(service, short)
        self.timing = CONVENTIONAL_SECONDS.labels(*self.conventional)
        self.handled: dict[str, tuple] = {}

    def record(self, code_name: str, seconds: float) -> None:
        counters = self.handled.get(code_name)
        if counters is None:
            counters = self.handled[code_name] = (
                GRPC_HANDLED.labels(*self.labels, code_name),
                CONVENTIONAL_HANDLED.labels(*self.conventional, code_name),
            )
        for counter in counters:
            counter.inc()
        self.seconds.observe(seconds)
        self.timing.observe(seconds)


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts calls by final status code and times them, under our names and the conventional ones
    (services/common/metrics.py). Health checks are not counted.

    The method labels are a method of a service registered on this server (from its descriptor) or
    "unknown": a caller's made-up method name never becomes a label, so probing cannot grow the
    series without bound. A made-up method no interceptor answers for is not counted at all.
    """

    def __init__(self, service: str, methods: dict[str, str] | None = None) -> None:
        self.service = service
        self.methods = methods or {}
        self._series: dict[tuple[str, str], _MethodSeries] = {}

    def _series_of(self, method: str, handler: grpc.RpcMethodHandler) -> _MethodSeries:
        short = self.methods.get(method, UNKNOWN_METHOD)
        key = (method if short != UNKNOWN_METHOD else UNKNOWN_METHOD, _grpc_type(handler))
        series = self._series.get(key)
        if series is None:
            grpc_service = method.rsplit("/", 2)[-2] if short != UNKNOWN_METHOD else UNKNOWN_METHOD
            series = self._series[key] = _MethodSeries(self.service, short, key[1], grpc_service, short)
        return series

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith("/grpc.") or handler is None:
            return handler
        series = self._series_of(method, handler)

        def record(context, started: float, failed: BaseException | None) -> None:
            code = context.code()
            if code is None:
                code = (
                    grpc.StatusCode.CANCELLED
                    if isinstance(failed, asyncio.CancelledError)
                    else (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
                )
            series.record(code.name if isinstance(code, grpc.StatusCode) else str(code), time.perf_counter() - started)

        def wrap_unary(behavior):
            async def wrapper(request, context):
                started, failed = time.perf_counter(), None
                series.started.inc()
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    record(context, started, failed)

            return wrapper

        def wrap_stream(behavior):
            async def wrapper(request, context):
                started, failed = time.perf_counter(), None
                series.started.inc()
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    record(context, started, failed)

            return wrapper

        return _wrap_handler(handler, wrap_unary, wrap_stream)


def method_labels(service_names: Iterable[str]) -> dict[str, str]:
    """'/package.Service/Method' -> 'Method' for the methods of these services, read from the
    protobuf descriptors their generated modules registered (a service without one has none)."""
    pool = descriptor_pool.Default()
    labels = {}
    for name in service_names:
        try:
            methods = pool.FindServiceByName(name).methods
        except KeyError:
            continue
        labels.update({f"/{name}/{m.name}": m.name for m in methods})
    return labels


@dataclass
class Binding:
    """One servicer to register: its `add_*_to_server` function and full service name."""

    add_to_server: Callable[[object, grpc.aio.Server], None]
    servicer: object
    service_name: str


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]
    drain: Drain = field(default_factory=Drain)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float, drain_wait_s: float = 0.0) -> None:
        """NOT_SERVING -> wait for balancers -> refuse new calls, let in-flight calls finish -> stop."""
        await self.health.enter_graceful_shutdown()
        if drain_wait_s > 0:
            await asyncio.sleep(drain_wait_s)
        started = time.monotonic()
        self.drain.draining = True
        await self.drain.wait_idle(grace_s)
        await self.server.stop(max(0.0, grace_s - (time.monotonic() - started)))
        for hook in self.on_stop:
            with contextlib.suppress(Exception):
                await hook()


async def create_server(
    settings: GrpcServiceSettings,
    service: str,
    bindings: Iterable[Binding],
    *,
    serving: bool = True,
    inner_interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    service_token: str | None = None,
) -> RunningServer:
    """Build and start a grpc.aio server with the production interceptor chain on settings' port.
    `inner_interceptors` run inside error mapping (e.g. authentication), so the MeshErrors they
    raise reach the caller with their code and details like any handler's. With `service_token`,
    the service-token check (services/common/service_auth.py) runs first of all, so that a call
    without it starts no span and creates no metric series."""
    bindings = list(bindings)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]
    drain = Drain()
    interceptors = [
        *service_auth.server_interceptors(service_token),
        *tracing.server_interceptors(),
        MetricsInterceptor(service, method_labels(b.service_name for b in bindings)),
        ErrorMappingInterceptor(drain),
        *inner_interceptors,
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    for b in bindings:
        b.add_to_server(b.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.service_name for b in bindings]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.grpc_port}")
    await server.start()
    running = RunningServer(server, port, health_servicer, names, drain)
    await running.set_serving(serving)
    log.info("grpc server listening", extra={"fields": {"service": service, "address": f"{settings.host}:{port}"}})
    return running


async def serve_until_signal(running: RunningServer, settings: GrpcServiceSettings) -> None:
    """Block until SIGTERM/SIGINT, then drain: NOT_SERVING, grace for in-flight calls, cleanup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight calls", extra={"fields": {"grace_s": settings.shutdown_grace_s}})
    await running.stop(settings.shutdown_grace_s, settings.drain_wait_s)
    tracing.shutdown_tracing()
    log.info("stopped")

"""Entry point: `meshserve serve inference` / `python -m services.inference.main`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tritonclient.grpc import service_pb2_grpc

from services.common import grpc_server, service_auth, tracing
from services.common.catalog import load_catalog
from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.inference.core import InferenceCore
from services.inference.http_server import HttpServer, start_http
from services.inference.repository import ModelRepository
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)
SERVICE_NAME = "inference.GRPCInferenceService"


@dataclass
class InferenceServer:
    """The running inference service: KServe v2 over gRPC and, unless http_port is -1, over HTTP."""

    grpc: grpc_server.RunningServer
    repository: ModelRepository
    http: HttpServer | None


async def start(settings: InferenceSettings) -> InferenceServer:
    """Start the servers (NOT_SERVING), then load models; SERVING once they are READY. The HTTP
    server shares the gRPC server's drain and stops before the models are released."""
    repository = ModelRepository(load_catalog(settings), settings.models_dir)
    servicer = InferenceServicer(InferenceCore(repository), repository, strict_readiness=settings.strict_readiness)
    binding = grpc_server.Binding(service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, SERVICE_NAME)
    token = service_auth.configured_token(settings)
    running = await grpc_server.create_server(settings, "inference", [binding], serving=False, service_token=token)
    try:
        http = await start_http(settings, servicer, running.drain, token)
    except BaseException:
        await running.stop(0)
        raise
    if http is not None:
        running.on_stop.append(http.stop)
    running.on_stop.append(repository.close)
    names = settings.models or list(repository.slots)
    for name in names:
        try:
            await repository.load(name)
        except Exception as exc:  # a model that fails to load stays UNAVAILABLE; the server still runs
            log.error("load failed", extra={"fields": {"model": name, "error": str(exc)}})
    await running.set_serving(all(repository.slot(n).state.value == "READY" for n in names))
    return InferenceServer(running, repository, http)


async def create(settings: InferenceSettings) -> tuple[grpc_server.RunningServer, ModelRepository]:
    """start(), answering (gRPC server, repository): what callers that need no HTTP port use."""
    server = await start(settings)
    return server.grpc, server.repository


async def amain(settings: InferenceSettings) -> None:
    tracing.setup_tracing("inference")
    start_metrics_server(settings.host, settings.metrics_port)
    running, _ = await create(settings)
    await grpc_server.serve_until_signal(running, settings)


def main() -> None:
    settings = InferenceSettings()
    setup_logging("inference", settings.log_level)
    import uvloop

    if settings.backend == "triton":
        from services.inference.triton_launcher import run_triton

        raise SystemExit(uvloop.run(run_triton(settings)))
    uvloop.run(amain(settings))


if __name__ == "__main__":
    main()

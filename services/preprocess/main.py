"""Entry point: `meshserve serve preprocess` / `python -m services.preprocess.main`."""

from __future__ import annotations

from meshserve.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common import grpc_server, service_auth, tracing
from services.common.catalog import load_catalog
from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.preprocess.core import Preprocessor
from services.preprocess.servicer import PreprocessServicer
from services.preprocess.settings import PreprocessSettings

SERVICE_NAME = preprocess_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name


async def create(settings: PreprocessSettings) -> grpc_server.RunningServer:
    core = Preprocessor(load_catalog(settings), settings.models_dir)
    binding = grpc_server.Binding(
        preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server, PreprocessServicer(core), SERVICE_NAME
    )
    return await grpc_server.create_server(
        settings, "preprocess", [binding], service_token=service_auth.configured_token(settings)
    )


async def amain(settings: PreprocessSettings) -> None:
    tracing.setup_tracing("preprocess")
    start_metrics_server(settings.host, settings.metrics_port)
    await grpc_server.serve_until_signal(await create(settings), settings)


def main() -> None:
    settings = PreprocessSettings()
    setup_logging("preprocess", settings.log_level)
    import uvloop

    uvloop.run(amain(settings))


if __name__ == "__main__":
    main()

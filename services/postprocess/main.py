"""Entry point: `meshserve serve postprocess` / `python -m services.postprocess.main`."""

from __future__ import annotations

from meshserve.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc

from services.common import grpc_server, service_auth, tracing
from services.common.catalog import load_catalog
from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.postprocess.core import Postprocessor
from services.postprocess.detokenize import Detokenizers
from services.postprocess.servicer import PostprocessServicer
from services.postprocess.settings import PostprocessSettings

SERVICE_NAME = postprocess_pb2.DESCRIPTOR.services_by_name["PostprocessService"].full_name


async def create(settings: PostprocessSettings) -> grpc_server.RunningServer:
    catalog = load_catalog(settings)
    servicer = PostprocessServicer(
        Postprocessor(catalog, settings.models_dir), Detokenizers(catalog, settings.models_dir)
    )
    binding = grpc_server.Binding(postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server, servicer, SERVICE_NAME)
    return await grpc_server.create_server(
        settings, "postprocess", [binding], service_token=service_auth.configured_token(settings)
    )


async def amain(settings: PostprocessSettings) -> None:
    tracing.setup_tracing("postprocess")
    start_metrics_server(settings.host, settings.metrics_port)
    await grpc_server.serve_until_signal(await create(settings), settings)


def main() -> None:
    settings = PostprocessSettings()
    setup_logging("postprocess", settings.log_level)
    import uvloop

    uvloop.run(amain(settings))


if __name__ == "__main__":
    main()

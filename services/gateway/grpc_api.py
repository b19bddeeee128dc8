"""The typed gRPC API (meshserve.gateway.v1.GatewayService) over the same Pipeline as REST."""

from __future__ import annotations

from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.catalog import ModelEntry
from services.common.tasks import task_from_pb, task_to_pb
from services.gateway.core import Pipeline


def model_pb(entry: ModelEntry, ready: bool | None) -> gateway_pb2.Model:
    status = gateway_pb2.MODEL_STATUS_UNSPECIFIED
    if ready is not None:
        status = gateway_pb2.MODEL_STATUS_READY if ready else gateway_pb2.MODEL_STATUS_UNAVAILABLE
    return gateway_pb2.Model(
        id=entry.id,
        tasks=[task_to_pb(t) for t in entry.tasks],
        owned_by=entry.owned_by,
        status=status,
        inference_name=entry.inference.name,
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def Predict(self, request: gateway_pb2.PredictRequest, context) -> gateway_pb2.PredictResponse:
        prediction = await self.pipeline.predict(
            request.model_id, task_from_pb(request.task), request.inputs, request.parameters
        )
        return gateway_pb2.PredictResponse(
            model_id=prediction.model_id,
            task=task_to_pb(prediction.task),
            result=prediction.result,
            usage=prediction.usage,
        )

    async def ListModels(self, request, context) -> gateway_pb2.ListModelsResponse:
        return gateway_pb2.ListModelsResponse(
            models=[model_pb(e, await self.pipeline.model_ready(e)) for e in self.pipeline.catalog.models]
        )

    async def GetModel(self, request: gateway_pb2.GetModelRequest, context) -> gateway_pb2.GetModelResponse:
        entry = self.pipeline.catalog.get(request.model_id)
        return gateway_pb2.GetModelResponse(model=model_pb(entry, await self.pipeline.model_ready(entry)))

"""The typed gRPC API (meshserve.gateway.v1.GatewayService) over the same Pipeline as REST."""

from __future__ import annotations

import uuid

from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.catalog import ModelEntry
from services.common.tasks import task_from_pb, task_to_pb
from services.gateway.auth import PRINCIPAL, Authenticator
from services.gateway.core import Pipeline
from services.gateway.metering import Metering, token_bound


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
    def __init__(self, pipeline: Pipeline, metering: Metering | None = None) -> None:
        self.pipeline = pipeline
        self.metering = metering or Metering(None, None, None, timeout_s=0)

    async def Predict(self, request: gateway_pb2.PredictRequest, context) -> gateway_pb2.PredictResponse:
        entry, task = self.pipeline.resolve(request.model_id, task_from_pb(request.task))
        principal = PRINCIPAL.get() or Authenticator.ANONYMOUS
        metered = await self.metering.admit(
            principal,
            entry,
            task,
            "grpc:Predict",
            uuid.uuid4().hex,
            max_input_tokens=token_bound(entry, request.inputs, request.parameters),
        )
        async with self.metering.track(metered):
            prediction = await self.pipeline.predict(entry.id, task, request.inputs, request.parameters)
            metered.add(
                input_tokens=prediction.usage.input_tokens, items=prediction.usage.items, compute_s=prediction.compute_s
            )
        # Usage, cost and rate-limit state, as the REST API's headers, in the trailing metadata.
        context.set_trailing_metadata(tuple((k.lower(), v) for k, v in metered.headers().items()))
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

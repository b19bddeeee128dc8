"""The typed gRPC API (meshserve.gateway.v1.GatewayService) over the same Pipeline as REST."""

from __future__ import annotations

import time
import uuid

from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import GENERATION_TASKS, ModelEntry
from services.common.errors import ErrorCode, MeshError
from services.common.tasks import task_from_pb, task_to_pb
from services.gateway.api.schemas import check_generation_pb
from services.gateway.control.auth import PRINCIPAL, Authenticator
from services.gateway.control.metering import Metering, token_bound
from services.gateway.pipeline.generation import GenerationRequest, Generator
from services.gateway.pipeline.runner import Pipeline


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
        self.generator = Generator(pipeline.preprocess, pipeline.inference, pipeline.postprocess)

    async def Generate(self, request: gateway_pb2.GenerateRequest, context):
        entry = self.pipeline.catalog.get(request.model_id)
        if not GENERATION_TASKS & set(entry.tasks):
            raise MeshError(ErrorCode.UNSUPPORTED_TASK, f"Model {entry.id!r} does not generate text", param="model_id")
        p = request.parameters
        check_generation_pb(p)
        gen = GenerationRequest(
            messages=[(m.role, m.content) for m in request.messages] or None,
            prompt=request.prompt,
            max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else None,
            min_new_tokens=p.min_new_tokens if p.HasField("min_new_tokens") else None,
            temperature=p.temperature if p.HasField("temperature") else None,
            top_p=p.top_p if p.HasField("top_p") else None,
            top_k=p.top_k if p.HasField("top_k") else None,
            seed=p.seed if p.HasField("seed") else None,
            repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else None,
            stop=list(p.stop),
        )
        principal, request_id = PRINCIPAL.get() or Authenticator.ANONYMOUS, uuid.uuid4().hex
        prepared, metered = await self.generator.start(  # admitted before the prompt is tokenized
            entry,
            gen,
            lambda **bounds: self.metering.admit(
                principal, entry, "text-generation", "grpc:Generate", request_id, **bounds
            ),
            self.metering,
        )
        started = time.perf_counter()
        async with self.metering.track(metered):
            try:
                async for step in self.generator.stream(entry, prepared, gen):
                    if step.final:
                        yield gateway_pb2.GenerateResponse(
                            text=step.text,
                            finish_reason=step.finish_reason or "",
                            usage=tasks_pb2.Usage(
                                input_tokens=step.prompt_tokens, output_tokens=step.completion_tokens, items=1
                            ),
                        )
                    else:
                        metered.add(output_tokens=1)
                        yield gateway_pb2.GenerateResponse(text=step.text, token_id=step.token_id)
            finally:  # the compute this request held, however it ended (cost per compute second)
                metered.compute_s = time.perf_counter() - started

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

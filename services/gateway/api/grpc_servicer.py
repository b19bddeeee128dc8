"""The typed gRPC API (meshserve.gateway.v1.GatewayService) over the same service layer as REST:
each method converts the message to the domain's inputs, calls one use case, converts back."""

from __future__ import annotations

import uuid
from contextlib import aclosing

import numpy as np
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import ModelEntry
from services.common.errors import ErrorCode, MeshError
from services.common.tasks import task_from_pb, task_to_pb
from services.gateway.api.routed import default_task, op_of, routed_headers
from services.gateway.api.schemas import check_generation_pb
from services.gateway.control.auth import PRINCIPAL, Authenticator
from services.gateway.providers.types import POLICIES
from services.gateway.service import GatewayServices
from services.gateway.service.context import CallContext
from services.gateway.service.generate import GenerationRequest, Step


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


def generation_request(request: gateway_pb2.GenerateRequest) -> GenerationRequest:
    """The message's prompt or chat and parameters (checked: INVALID_ARGUMENT naming the field)."""
    p = request.parameters
    check_generation_pb(p)
    return GenerationRequest(
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


def generate_response(step: Step) -> gateway_pb2.GenerateResponse:
    if not step.final:
        return gateway_pb2.GenerateResponse(text=step.text, token_id=step.token_id)
    usage = tasks_pb2.Usage(input_tokens=step.prompt_tokens, output_tokens=step.completion_tokens, items=1)
    return gateway_pb2.GenerateResponse(text=step.text, finish_reason=step.finish_reason or "", usage=usage)


def call_context(method: str) -> CallContext:
    """The caller (GrpcAuthInterceptor's principal) and a fresh request id."""
    return CallContext(PRINCIPAL.get() or Authenticator.ANONYMOUS, uuid.uuid4().hex, f"grpc:{method}")


def routed_model(request) -> tuple[str, str | None]:
    """The message's model and provider for the router: a policy in `provider` is the model's
    suffix (`id:fastest`), a provider's name the explicit provider; empty: the model id as sent."""
    provider = request.provider or None
    if provider in POLICIES or provider == "auto":
        return f"{request.model_id}:{provider}", None
    return request.model_id, provider


def embeddings_pb(vectors) -> tasks_pb2.TaskResult:
    """A remote provider's vectors as the local mesh's feature-extraction result."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    tensor = tasks_pb2.Tensor(name="embeddings", datatype="FP32", shape=list(vectors.shape), raw=vectors.tobytes())
    return tasks_pb2.TaskResult(embeddings=tensor)


def similarities_pb(results: list[tuple[int, float]]) -> tasks_pb2.TaskResult:
    """A ranking's (index, score) pairs as the local mesh's result: scores in document order."""
    scores = [0.0] * len(results)
    for index, score in results:
        scores[index] = score
    return tasks_pb2.TaskResult(similarities=tasks_pb2.Similarities(scores=scores))


def routed_metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((k.lower(), v) for k, v in headers.items())


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, services: GatewayServices) -> None:
        self.services = services

    async def Generate(self, request: gateway_pb2.GenerateRequest, context):
        ctx = call_context("Generate")
        model, provider = routed_model(request)
        op = "chat" if request.messages else "completion"
        route = self.services.routing.route(model, op, provider=provider, principal=ctx.principal)
        gen = generation_request(request)
        if route.local_only:
            service = self.services.generate
            entry = service.entry(route.model_id, param="model_id", list_tasks=False)
            generation = await service.start(ctx, entry, gen)  # admitted before tokenizing
        else:
            generation = await self.services.routing.start(ctx, route, gen, op, True)
            metered = generation.metered
            context.set_trailing_metadata(routed_metadata(routed_headers(metered)))
        async with generation.settled(), aclosing(generation.steps()) as steps:
            async for step in steps:
                yield generate_response(step)

    async def Predict(self, request: gateway_pb2.PredictRequest, context) -> gateway_pb2.PredictResponse:
        ctx, routing = call_context("Predict"), self.services.routing
        model, provider = routed_model(request)
        task = task_from_pb(request.task)
        runs = task or default_task(self.services, model)
        op = "rerank" if runs == "text-ranking" else op_of(runs)  # typed inputs: a ranker's rerank op
        route = routing.route(model, op, provider=provider, principal=ctx.principal)
        if not route.local_only:
            return await self.routed_predict(ctx, route, task, request, context)
        prediction, headers = await self.services.predict.predict(
            ctx, route.model_id, task, request.inputs, request.parameters
        )
        # Usage, cost and rate-limit state, as the REST API's headers, in the trailing metadata.
        context.set_trailing_metadata(routed_metadata(headers))
        return gateway_pb2.PredictResponse(
            model_id=prediction.model_id,
            task=task_to_pb(prediction.task),
            result=prediction.result,
            usage=prediction.usage,
        )

    async def routed_predict(self, ctx, route, task, request: gateway_pb2.PredictRequest, context):
        """Predict over several providers, or a remote one: feature-extraction (embeddings) and
        text-ranking (rerank); the other tasks go over REST (`/models/{id}`), whose JSON passes through."""
        task = task or default_task(self.services, route.model_id)
        kind, p = request.inputs.WhichOneof("kind"), request.parameters
        if task == "feature-extraction" and kind == "text":
            texts = list(request.inputs.text.texts)
            embedded, headers = await self.services.routing.embeddings(
                ctx, route, texts, dimensions=p.dimensions if p.HasField("dimensions") else None,
                prompt_name=p.prompt_name if p.HasField("prompt_name") else None,
            )  # fmt: skip
            result, tokens, items = embeddings_pb(embedded.vectors), embedded.input_tokens, len(texts)
        elif task == "text-ranking" and kind == "text_ranking":
            ranking = request.inputs.text_ranking
            ranked = await self.services.routing.rerank(
                ctx, route, ranking.query, list(ranking.documents), raw_scores=p.raw_scores, truncate=p.truncate
            )
            result, tokens, headers = similarities_pb(ranked.results), ranked.input_tokens, ranked.headers
            items = len(ranked.results)
        else:
            raise MeshError(
                ErrorCode.UNSUPPORTED_TASK,
                f"Predict on remote providers runs feature-extraction and text-ranking; send {task!r} to "
                f"POST /models/{route.model_id}",
                param="task",
            )
        context.set_trailing_metadata(routed_metadata(headers))
        usage = tasks_pb2.Usage(input_tokens=tokens or 0, items=items)
        return gateway_pb2.PredictResponse(model_id=route.model_id, task=task_to_pb(task), result=result, usage=usage)

    async def ListModels(self, request, context) -> gateway_pb2.ListModelsResponse:
        models = self.services.models
        return gateway_pb2.ListModelsResponse(
            models=[model_pb(e, await models.ready(e)) for e in models.catalog.models]
        )

    async def GetModel(self, request: gateway_pb2.GetModelRequest, context) -> gateway_pb2.GetModelResponse:
        models = self.services.models
        entry = models.get(request.model_id)
        return gateway_pb2.GetModelResponse(model=model_pb(entry, await models.ready(entry)))

"""Per-provider paths, the HF router's convention: `/{provider}/v1/chat/completions`,
`/{provider}/v1/completions`, `/{provider}/v1/embeddings` and `/{provider}/models/{id}` (with
`…/pipeline/{task}` and `…/v1/chat/completions`) run the dialect's route with that provider only,
as `model: "id:provider"` would. Added after every other router, so existing paths win; an
unknown provider is a 404 in the caller's dialect naming the providers."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from services.gateway.api import routed, routes_embeddings, routes_hf, routes_openai
from services.gateway.api.deps import call_context
from services.gateway.service.context import CallContext

router = APIRouter(tags=["providers"])


@router.post(
    "/{provider}/v1/chat/completions",
    summary="Chat completions (OpenAI) by one provider",
    openapi_extra=routes_openai.CHAT_BODY,
)
async def provider_chat(request: Request, provider: str, ctx: CallContext = Depends(call_context)):
    return await routes_openai.chat(request, ctx, None, routed.check_provider(request, provider))


@router.post(
    "/{provider}/v1/completions",
    summary="Completions (OpenAI legacy) by one provider",
    openapi_extra=routes_openai.COMPLETION_BODY,
)
async def provider_completions(request: Request, provider: str, ctx: CallContext = Depends(call_context)):
    return await routes_openai.complete(request, ctx, routed.check_provider(request, provider))


@router.post(
    "/{provider}/v1/embeddings",
    summary="Embeddings (OpenAI) by one provider",
    openapi_extra=routes_embeddings.EMBEDDINGS_BODY,
)
async def provider_embeddings(request: Request, provider: str, ctx: CallContext = Depends(call_context)):
    return await routes_embeddings.embed(request, ctx, routed.check_provider(request, provider))


@router.post(
    "/{provider}/models/{model_path:path}",
    summary="Run a model's task (HF Inference API) by one provider",
    openapi_extra=routes_hf.HF_BODY,
)
async def provider_model(request: Request, provider: str, model_path: str):
    return await routes_hf.hf_post(request, model_path, routed.check_provider(request, provider))

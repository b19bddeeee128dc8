"""The OpenAI embeddings route over the service layer: `POST /v1/embeddings` (and, through
routes_providers, `/{provider}/v1/embeddings`)."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from services.common import caps
from services.common.errors import invalid
from services.gateway.api import hf_tasks, routed
from services.gateway.api.deps import call_context_of, services_of
from services.gateway.api.http_io import json_response, read_json
from services.gateway.api.schemas import EmbeddingsRequest
from services.gateway.service.context import CallContext
from services.gateway.service.validation import parse

router = APIRouter(tags=["openai"])

EMBEDDINGS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": EmbeddingsRequest.model_json_schema()}},
    }
}


@router.post("/v1/embeddings", summary="Create embeddings (OpenAI)", openapi_extra=EMBEDDINGS_BODY)
async def embeddings(request: Request):
    return await embed(request, call_context_of(request), None)


async def embed(request: Request, ctx: CallContext, provider: str | None):
    """`POST /v1/embeddings`, or `/{provider}/v1/embeddings` (`provider`: the path's)."""
    services = services_of(request)
    body = parse(EmbeddingsRequest, await read_json(request, request.app.state.max_body_bytes))
    route = routed.route(request, ctx, body.model, "embed", provider)
    if isinstance(body.input, list) and body.input and not isinstance(body.input[0], str):
        raise invalid("token-id arrays are not supported as `input`; send text", param="input")
    texts, _ = hf_tasks.texts(body.input, "input")
    if route.local_only:
        entry = route.entry
        caps.check_texts(entry, texts, field="input")
        hf_tasks.check_dimensions(entry, body.dimensions)
        hf_tasks.check_prompt_name(entry, body.prompt_name)
        result, headers = await services.embed.embeddings(
            ctx, entry, texts, dimensions=body.dimensions, prompt_name=body.prompt_name
        )
    else:
        result, headers = await services.routing.embeddings(
            ctx, route, texts, dimensions=body.dimensions, prompt_name=body.prompt_name
        )
    if body.encoding_format == "base64":
        values = [base64.b64encode(row.tobytes()).decode() for row in result.vectors]  # little-endian float32
    else:
        values = list(result.vectors)
    tokens = result.input_tokens
    return json_response(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)],
            "model": route.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers=headers,
    )

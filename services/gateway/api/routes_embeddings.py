"""The OpenAI embeddings routes over the service layer: `POST /v1/embeddings` (and, through
routes_providers, `/{provider}/v1/embeddings`), where token ids are the model's own (vLLM's
reading), and `POST /tiktoken/v1/embeddings`, where they are tiktoken's cl100k_base ids (the
OpenAI API's reading, which LangChain's OpenAIEmbeddings relies on by default)."""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Request

from services.common import caps
from services.common.errors import invalid
from services.gateway.api import hf_tasks, routed
from services.gateway.api.deps import call_context_of, services_of
from services.gateway.api.http_io import json_response, read_json
from services.gateway.api.schemas import INT64_MAX, EmbeddingsRequest
from services.gateway.service import tiktoken_ids
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


@router.post(
    "/tiktoken/v1/embeddings",
    summary="Create embeddings, token ids read as tiktoken's cl100k_base (LangChain's default)",
    openapi_extra=EMBEDDINGS_BODY,
)
async def tiktoken_embeddings(request: Request):
    """OpenAI's own reading of token-id input: cl100k_base ids, decoded to text and embedded with
    the model's tokenizer, cut to its token limit as sentence-transformers does (LangChain splits
    texts at 8191 cl100k tokens, far over most embedding models' limits). Text input as on /v1."""
    return await embed(request, call_context_of(request), None, tiktoken=True)


def token_lists(value) -> list[list[int]] | None:
    """Token-id input (`[int, ...]` or `[[int, ...], ...]`) as id lists; None for text input."""
    if not isinstance(value, list) or not value or isinstance(value[0], str):
        return None
    items = [value] if isinstance(value[0], int) else value
    if any(not 0 <= t <= INT64_MAX for ids in items for t in ids):
        raise invalid("`input`: token ids must be between 0 and 2**63 - 1", param="input")
    return items


async def embed(request: Request, ctx: CallContext, provider: str | None, *, tiktoken: bool = False):
    """`POST /v1/embeddings`, or `/{provider}/v1/embeddings` (`provider`: the path's); `tiktoken`:
    token ids are cl100k_base's (`/tiktoken/v1/embeddings`), else the model's own (vLLM's reading)."""
    services = services_of(request)
    body = parse(EmbeddingsRequest, await read_json(request, request.app.state.max_body_bytes))
    route = routed.route(request, ctx, body.model, "embed", provider)
    items = token_lists(body.input)
    if items is not None and not tiktoken:
        result, headers = await own_token_ids(services, ctx, route, items, body)
    else:
        texts = hf_tasks.texts(body.input, "input")[0] if items is None else await decoded(items)
        result, headers = await text_embeddings(services, ctx, route, texts, body, truncate=items is not None)
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


async def decoded(items: list[list[int]]) -> list[str]:
    """cl100k_base ids as texts (the encoding is loaded once, in a thread: it parses 100k ranks)."""
    await asyncio.to_thread(tiktoken_ids.encoding)
    return tiktoken_ids.decode(items)


async def own_token_ids(services, ctx: CallContext, route, items: list[list[int]], body: EmbeddingsRequest):
    """Token ids of the model's own tokenizer: the local mesh only (a remote provider's tokenizer
    is not ours to know), without a prompt (it would be text before ids)."""
    if not route.local_only:
        raise invalid("token-id `input` is served by the local mesh only; send text", param="input")
    if body.prompt_name is not None:
        raise invalid("`prompt_name` needs text `input` (token ids are used as they are)", param="prompt_name")
    hf_tasks.check_dimensions(route.entry, body.dimensions)
    return await services.embed.token_embeddings(ctx, route.entry, items, dimensions=body.dimensions)


async def text_embeddings(services, ctx: CallContext, route, texts: list[str], body, *, truncate: bool):
    """Texts on the local mesh (over-long ones refused unless `truncate`) or over the providers."""
    if route.local_only:
        entry = route.entry
        caps.check_texts(entry, texts, field="input")
        hf_tasks.check_dimensions(entry, body.dimensions)
        hf_tasks.check_prompt_name(entry, body.prompt_name)
        return await services.embed.embeddings(
            ctx, entry, texts, dimensions=body.dimensions, prompt_name=body.prompt_name, truncate=truncate
        )
    return await services.routing.embeddings(
        ctx, route, texts, dimensions=body.dimensions, prompt_name=body.prompt_name
    )

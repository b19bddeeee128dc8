"""Reranking routes over the service layer: TEI's `POST /rerank` (a sorted list of {index, score,
text?}) and the Cohere/Jina `POST /v1/rerank` and `/v2/rerank` that vLLM and infinity serve
({id, model, usage, results: [{index, relevance_score, document}]}); errors in OpenAI's dialect there."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from services.gateway.api import routed
from services.gateway.api.deps import call_context_of, services_of
from services.gateway.api.http_io import json_response, read_json
from services.gateway.api.rerank_schemas import CohereRerankRequest, TEIRerankRequest
from services.gateway.service.rerank import Ranked, ranking_model, rerank
from services.gateway.service.validation import parse

router = APIRouter(tags=["rerank"])


def _body(schema) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


async def ranking(request: Request, model: str | None, query: str, texts: list[str], **options) -> Ranked:
    """The documents ranked by the named model (a provider or policy suffix allowed: routed when
    a remote provider serves it), else by the only local ranking model."""
    services, ctx = services_of(request), call_context_of(request)
    if model:
        route = routed.route(request, ctx, model, "rerank")
        if not route.local_only:
            return await services.routing.rerank(ctx, route, query, texts, **options)
        model = route.model_id
    entry = ranking_model(services.predict, model)
    request.state.model = entry.id
    return await rerank(services.predict, ctx, entry, query, texts, **options)


@router.post("/rerank", summary="Rerank texts against a query (TEI)", openapi_extra=_body(TEIRerankRequest))
async def tei_rerank(request: Request):
    body = parse(TEIRerankRequest, await read_json(request, request.app.state.max_body_bytes))
    ranked = await ranking(
        request, body.model, body.query, body.texts, raw_scores=body.raw_scores, truncate=bool(body.truncate)
    )
    results = []
    for index, score in ranked.results:
        item = {"index": index, "score": score}
        if body.return_text:
            item["text"] = body.texts[index]
        results.append(item)
    return json_response(results, headers=ranked.headers)


@router.post("/v1/rerank", summary="Rerank documents (Cohere/Jina)", openapi_extra=_body(CohereRerankRequest))
@router.post("/v2/rerank", summary="Rerank documents (Cohere v2)", openapi_extra=_body(CohereRerankRequest))
async def cohere_rerank(request: Request):
    body = parse(CohereRerankRequest, await read_json(request, request.app.state.max_body_bytes))
    texts = body.texts()
    ranked = await ranking(
        request, body.model, body.query, texts, raw_scores=body.raw_scores, truncate=body.truncate, top_n=body.top_n
    )
    results = []
    for index, score in ranked.results:
        item = {"index": index, "relevance_score": score}
        if body.return_documents:
            item["document"] = {"text": texts[index]}
        results.append(item)
    tokens = ranked.input_tokens
    return json_response(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": ranked.model_id,
            "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
            "results": results,
        },
        headers=ranked.headers,
    )

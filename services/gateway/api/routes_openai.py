"""The OpenAI dialect over the service layer: models, chat completions and completions
(embeddings: routes_embeddings) (stream or not). Also `chat` for huggingface_hub's chat_completion on a model URL
(`POST /models/{id}/v1/chat/completions`, routed by routes_hf)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from services.common.catalog import GENERATION_TASKS, ModelEntry
from services.common.errors import invalid
from services.gateway.api import routed, structured
from services.gateway.api.deps import call_context_of, services_of
from services.gateway.api.docs import request_body
from services.gateway.api.generation_responses import respond
from services.gateway.api.generation_schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from services.gateway.api.http_io import GENERATION_BODY_BYTES, json_response, read_json
from services.gateway.api.sse import chat_events, chat_logprobs, completion_events, completion_logprobs
from services.gateway.control import genai
from services.gateway.service.context import CallContext
from services.gateway.service.generate import Collected, GenerationRequest
from services.gateway.service.validation import parse

# Chat and completions come first in the schema (as they always have), the other routes after the
# operations routes: two routers, included in that order by create_app.
generation_router = APIRouter(tags=["openai"])
router = APIRouter(tags=["openai"])


def model_card(entry, created: int, ready: bool | None = None) -> dict:
    """A model as OpenAI lists it; `entry`: a catalog ModelEntry or a remote-only model."""
    card = {
        "id": entry.id,
        "object": "model",
        "created": created,
        "owned_by": entry.owned_by,
        "tasks": list(entry.tasks),
    }
    if ready is not None:
        card["status"] = "ready" if ready else "unavailable"
    return card


def router_flags(provider: dict, generates: bool) -> dict[str, bool]:
    """The HF router's per-provider capability keys: our own mesh decodes tools and JSON schemas for
    every generation model (structured.py); a remote provider's requests with them are refused."""
    ours = generates and provider.get("provider") == "local"
    return {"supports_tools": ours, "supports_structured_output": ours}


def providers_listing(services) -> dict[str, list[dict]]:
    """Per model id its providers, in the HF router's shape (`data[].providers[]`) plus ours."""
    registry = routed.registry_of(services)
    listing = {}
    for model in registry.models():
        generates = bool(GENERATION_TASKS.intersection(registry.model(model["id"]).tasks))
        listing[model["id"]] = [{**p, **router_flags(p, generates)} for p in model["providers"]]
    return listing


@router.get("/v1/models", summary="List models, each with its providers")
async def list_models(request: Request):
    created, services = request.app.state.catalog_created, services_of(request)
    listing = providers_listing(services)
    registry = routed.registry_of(services)
    data = [{**model_card(registry.model(model_id), created), "providers": p} for model_id, p in listing.items()]
    return json_response({"object": "list", "data": data})


@router.get("/v1/models/{model_path:path}", summary="Describe one model ('/' or %2F in the id)")
async def get_model(request: Request, model_path: str):
    services = services_of(request)
    models, registry = services.models, routed.registry_of(services)
    entry = registry.model(model_path)  # a catalog entry or a remote-only model; else 404
    providers = providers_listing(services).get(entry.id, [])
    if not isinstance(entry, ModelEntry):
        live = any(p["status"] == "live" for p in providers)
        card = model_card(entry, request.app.state.catalog_created, live)
        return json_response({**card, "providers": providers, "meshserve": {"default_task": entry.default_task}})
    card = model_card(entry, request.app.state.catalog_created, await models.ready(entry))
    card["providers"] = providers
    card["meshserve"] = {
        "default_task": entry.default_task,
        "inference_name": entry.inference.name,
        "input_kind": entry.preprocess.kind,
        "labels": list(entry.postprocess.labels),
        "max_input_tokens": entry.preprocess.max_length,
        "max_items": entry.preprocess.max_items,
        "inputs": [t.model_dump() for t in entry.inference.inputs],
        "outputs": [t.model_dump() for t in entry.inference.outputs],
    }
    return json_response(card)


def sampling(body: SamplingRequest, **what) -> GenerationRequest:
    """The OpenAI routes' sampling fields, vLLM's extras among them; `what`: the messages or
    prompt and max_new_tokens."""
    top_k = 0 if body.top_k == -1 else body.top_k  # vLLM's -1: off
    return GenerationRequest(
        min_new_tokens=body.min_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        top_k=top_k, repetition_penalty=body.repetition_penalty, stop=body.stops(), sampling=body.extras(),
        n=body.n or 1, json_schema=structured.response_format_schema(body.response_format), **what,
    )  # fmt: skip


async def _start(request: Request, ctx: CallContext, body: SamplingRequest, gen: GenerationRequest, op: str,
                 model_id: str | None, provider: str | None):  # fmt: skip
    """The routed and started generation, with its headers; n > 1 only on the local mesh."""
    route = routed.route(request, ctx, model_id or body.model, op, provider)
    structured.check_local(route, gen)
    if gen.n > 1 and not route.local_only:
        raise invalid("`n` > 1 is served by the local mesh only; this model is routed to providers", param="n")
    generation, extra = await routed.start_generation(request, ctx, route, gen, op, bool(body.stream))
    return route, generation, extra


def _events(body: SamplingRequest, generation, gen: GenerationRequest) -> dict:
    """The stream renderers' options of a request."""
    prepared = getattr(generation, "prepared", None)
    return {
        "n": gen.n, "logprobs": bool(gen.sampling and gen.sampling.logprobs), "continuous": body.continuous_usage(),
        "prompt_tokens": prepared.prompt_tokens if prepared is not None else 0,
    }  # fmt: skip


def _choices(done: Collected) -> tuple[Collected, ...]:
    return done.choices or (done,)


def _usage(done: Collected) -> dict:
    """OpenAI's usage: the prompt once, the tokens of every choice."""
    prompt, completion = done.last.prompt_tokens, done.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def chat(request: Request, ctx: CallContext, model_id: str | None, provider: str | None = None):
    """`POST /v1/chat/completions`, or on a model URL (`model_id`: the URL's model, which may
    carry a provider suffix), or on a per-provider path (`provider`)."""
    body = parse(ChatCompletionRequest, await read_json(request, GENERATION_BODY_BYTES))
    body.check_supported()
    messages = [(m.role if m.role != "developer" else "system", m.text(i)) for i, m in enumerate(body.messages)]
    gen = sampling(body, messages=messages, max_new_tokens=body.max_completion_tokens or body.max_tokens)
    plan = structured.tool_plan(body.tools, body.tool_choice)
    if plan.parses and gen.n > 1:
        raise invalid("`n` > 1 with `tools` is not supported: one choice per tool-calling request", param="n")
    gen = structured.with_tools(gen, plan, body.messages)
    route, generation, extra = await _start(request, ctx, body, gen, "chat", model_id, provider)
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": route.model_id,
        "system_fingerprint": "meshserve",
    }  # fmt: skip
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    genai.annotate_response(head["id"], model=route.model_id)  # a stream's finish reasons come later
    options = _events(body, generation, gen)

    def render(done: Collected) -> dict:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
             "logprobs": chat_logprobs(c.tokens) if options["logprobs"] else None,
             "finish_reason": c.last.finish_reason}
            for i, c in enumerate(_choices(done))
        ]  # fmt: skip
        for choice in choices:
            structured.render_calls(plan, choice)
        genai.annotate_response(head["id"], [c["finish_reason"] for c in choices], route.model_id)
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(done)}

    def events(steps):
        if plan.parses:
            return structured.tool_chat_events(steps, head, include_usage, plan)
        return chat_events(steps, head, include_usage, **options)

    return await respond(generation, bool(body.stream), events, render, extra=extra)


# The call context without Depends(): FastAPI's dependency solving (query parsing, a dependency
# cache) costs more per request than the whole control plane on a pass-through route.
CHAT_BODY = request_body(ChatCompletionRequest)
COMPLETION_BODY = request_body(CompletionRequest)


@generation_router.post(
    "/v1/chat/completions", summary="Chat completions (OpenAI), stream or not", openapi_extra=CHAT_BODY
)
async def chat_completions(request: Request):
    return await chat(request, call_context_of(request), None)


@generation_router.post(
    "/v1/completions", summary="Completions (OpenAI legacy), stream or not", openapi_extra=COMPLETION_BODY
)
async def completions(request: Request):
    return await complete(request, call_context_of(request), None)


async def complete(request: Request, ctx: CallContext, provider: str | None):
    """`POST /v1/completions`, or `/{provider}/v1/completions` (`provider`: the path's)."""
    body = parse(CompletionRequest, await read_json(request, GENERATION_BODY_BYTES))
    body.check_supported()
    if body.echo or body.suffix:
        raise invalid("`echo` and `suffix` are not supported", param="echo" if body.echo else "suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise invalid("`best_of` must equal `n`: every sampled sequence is returned", param="best_of")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise invalid("`prompt` must be one string (one completion per request)", param="prompt")
    gen = sampling(body, prompt=prompts[0], max_new_tokens=body.max_tokens or 16)  # OpenAI's default: 16
    route, generation, extra = await _start(request, ctx, body, gen, "completion", None, provider)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": route.model_id}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    genai.annotate_response(head["id"], model=route.model_id)  # a stream's finish reasons come later
    options = _events(body, generation, gen)

    def render(done: Collected) -> dict:
        choices = [
            {"index": i, "text": c.text, "logprobs": completion_logprobs(c.tokens) if options["logprobs"] else None,
             "finish_reason": c.last.finish_reason}
            for i, c in enumerate(_choices(done))
        ]  # fmt: skip
        genai.annotate_response(head["id"], [c["finish_reason"] for c in choices], route.model_id)
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(done)}

    events = lambda steps: completion_events(steps, head, include_usage, **options)  # noqa: E731
    return await respond(generation, bool(body.stream), events, render, extra=extra)

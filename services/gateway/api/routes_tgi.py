"""The HF/TGI `text_generation` dialect on `POST /models/{id}` (routes_hf dispatches a generation
model's requests here): `{"inputs": prompt, "parameters", "stream"}`, answered as TGI answers,
one `[{generated_text, details}]` body or TGI's token events.

TGI's own routes, in the shapes of its published OpenAPI document: TGI serves one model, and so
does each base URL `/tgi/{model id}`: `POST …/generate` (one GenerateResponse object), `POST
…/generate_stream` (StreamResponse events), `GET …/info` (TGI's Info), and a POST on the base
URL itself (TGI's `/`: `stream` in the body, a list of GenerateResponse), which is what
huggingface_hub's text_generation sends to a URL model. `generate` and `info` here also serve
`/models/{id}/generate`, `…/generate_stream` and `…/info` once routes_hf dispatches those suffixes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.catalog import GENERATION_TASKS, ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.gateway.api import routed
from services.gateway.api.deps import call_context_of, services_of
from services.gateway.api.generation_responses import respond
from services.gateway.api.generation_schemas import TGIParameters
from services.gateway.api.http_io import json_response, read_json
from services.gateway.api.schemas import MAX_STOP_STRINGS, check_stops
from services.gateway.api.sse import tgi_error_event, tgi_events, tgi_reason, tgi_token
from services.gateway.service.context import CallContext
from services.gateway.service.generate import Collected, GenerationRequest
from services.gateway.service.validation import parse

router = APIRouter(tags=["text-generation-inference"])
TGI_VERSION = "3.3.6"  # the TGI API version whose shapes these routes follow (docs/openapi.json)
BODY_KEYS = {"inputs", "parameters", "stream", "options"}  # TGI's `/` (and the HF API's) body
GENERATE_KEYS = {"inputs", "parameters"}  # TGI's /generate and /generate_stream body


def generation_request(body: dict, keys: set[str] = BODY_KEYS) -> tuple[GenerationRequest, TGIParameters]:
    """The body checked (400 naming what is wrong or unsupported) as the service's request."""
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object with `inputs`")
    extra = set(body) - keys
    if extra:
        raise invalid(f"unknown field(s) {sorted(extra)}: put task parameters under `parameters`")
    if not isinstance(body.get("inputs"), str) or not body["inputs"]:
        raise invalid("`inputs` must be a non-empty string (the prompt)", param="inputs")
    p = parse(TGIParameters, body.get("parameters") or {}, where="parameters")
    p.check_supported()
    if p.decoder_input_details and body.get("stream"):  # as TGI: the prefill is in the final details only
        raise invalid(
            "`parameters.decoder_input_details` is not supported when streaming tokens",
            param="parameters.decoder_input_details",
        )
    sample = p.do_sample or any(v is not None for v in (p.temperature, p.top_p, p.top_k))
    gen = GenerationRequest(
        prompt=body["inputs"],
        max_new_tokens=p.max_new_tokens,
        temperature=(p.temperature if p.temperature is not None else 1.0) if sample else 0.0,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty,
        stop=check_stops(p.stop or [], "parameters.stop"),
        prompt_logprobs=bool(p.details and p.decoder_input_details),
    )
    return gen, p


async def text_generation(
    request: Request, ctx: CallContext, route, body: dict, *, stream: bool | None = None, single: bool = False
):
    """A generation model's HF/TGI request on the route's model (local or routed); `stream`: TGI's
    /generate (False) or /generate_stream (True), else the body's `stream`; `single`: one
    GenerateResponse object (TGI's /generate) instead of a list of one (TGI's `/`, the HF API)."""
    gen, p = generation_request(body, BODY_KEYS if stream is None else GENERATE_KEYS)
    prefix = body["inputs"] if p.return_full_text else ""

    def render(done: Collected):
        result = {"generated_text": prefix + done.text}
        if p.details:
            last = done.last
            result["details"] = {
                "finish_reason": tgi_reason(last.finish_reason),
                "generated_tokens": last.completion_tokens,
                "seed": p.seed,
                "prefill": [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in last.prefill],
                "tokens": [tgi_token(step) for step in done.tokens],
            }
        return result if single else [result]

    stream = bool(body.get("stream")) if stream is None else stream
    generation, extra = await routed.start_generation(request, ctx, route, gen, "completion", stream)
    prompt_tokens = generation.prepared.prompt_tokens
    return await respond(
        generation, stream, lambda steps: tgi_events(steps, prefix, p.seed, prompt_tokens), render,
        tgi_error_event, extra=extra,
    )  # fmt: skip


async def generate(request: Request, model: str, *, stream: bool | None, provider: str | None = None):
    """TGI's /generate (`stream` False), /generate_stream (True) or `/` (None: the body's) on `model`."""
    ctx = call_context_of(request)
    route = routed.route(request, ctx, model, "completion", provider)
    if route.local_only:
        task = route.entry.default_task
        if task not in GENERATION_TASKS:
            raise MeshError(ErrorCode.UNSUPPORTED_TASK, f"model {route.model_id!r} does not generate text ({task})")
    body = await read_json(request, request.app.state.max_body_bytes)
    return await text_generation(request, ctx, route, body, stream=stream, single=stream is False)


def info(entry: ModelEntry) -> dict:
    """TGI's Info of a generation model (every required field; nullable ones null)."""
    spec = entry.preprocess
    return {
        "model_id": entry.id,
        "model_sha": None,
        "model_pipeline_tag": entry.default_task,
        "max_concurrent_requests": entry.inference.max_queue_size,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_STRINGS,
        "max_input_tokens": spec.max_input_tokens or spec.max_length,
        "max_total_tokens": spec.max_total_tokens or spec.max_length,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "meshserve",
        "version": TGI_VERSION,
        "sha": None,
        "docker_label": None,
    }


SUFFIXES = (("/generate_stream", True), ("/generate", False))


@router.post("/tgi/{path:path}", summary="A model's TGI base URL: …/generate, …/generate_stream, or the URL itself")
async def tgi_post(request: Request, path: str):
    for suffix, stream in SUFFIXES:
        if path.endswith(suffix):
            return await generate(request, path.removesuffix(suffix), stream=stream)
    return await generate(request, path, stream=None)


@router.get("/tgi/{path:path}", summary="A model's TGI info: /tgi/{model id}/info")
async def tgi_get(request: Request, path: str):
    if not path.endswith("/info"):
        raise StarletteHTTPException(404)
    entry = services_of(request).models.get(path.removesuffix("/info"))
    if entry.default_task not in GENERATION_TASKS:
        raise MeshError(ErrorCode.UNSUPPORTED_TASK, f"model {entry.id!r} does not generate text")
    request.state.model = entry.id
    return json_response(info(entry))

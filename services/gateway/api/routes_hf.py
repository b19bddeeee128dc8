"""The HF Inference API dialect over the service layer: `POST /models/{id}` (task from the body's
shape or the model's default), `…/pipeline/{task}`, `POST /v1/models/{id}/predict`, a model's
`…/health` and `…/info`, and the hint for a client pointed at no model.

Model ids contain '/', so model routes take the rest of the path and parse known suffixes from
the right ('%2F' arrives decoded). Generation models answer in the TGI dialect (routes_tgi);
`…/v1/chat/completions` on a model URL is OpenAI's chat (routes_openai)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.catalog import GENERATION_TASKS, IMAGE_TASKS, ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.gateway.api import hf_tasks, routed, routes_openai, routes_tgi
from services.gateway.api.deps import call_context_of, hf_dialect_of, services_of
from services.gateway.api.http_io import header_flag, json_bytes, json_response, parse_json, read_bytes, read_json
from services.gateway.api.schemas import HFOptions, HFTaskRequest
from services.gateway.service.routing import LocalTask
from services.gateway.service.validation import parse

router = APIRouter(tags=["huggingface"])
no_model_router = APIRouter(include_in_schema=False)

HF_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": HFTaskRequest.model_json_schema()}},
    }
}
CHAT_SUFFIX = "/v1/chat/completions"
# What an `hf` provider gets of the caller's headers (a raw upload's type, the HF API's options).
FORWARDED = ("content-type", "x-wait-for-model", "x-use-cache")


async def read_hf_body(request: Request, task: str, limit: int):
    """The body as JSON, or an HFRequest for a raw image upload (no or non-JSON Content-Type)."""
    content_type = request.headers.get("content-type", "")
    if task in IMAGE_TASKS and "json" not in content_type:
        data = await read_bytes(request, limit)
        if data.lstrip()[:1] != b"{":
            return hf_tasks.raw_image_request(data)
        return parse_json(data)
    return await read_json(request, limit)


def hf_request(entry: ModelEntry, task: str, body) -> tuple[hf_tasks.HFRequest, HFOptions]:
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object with `inputs`")
    if "inputs" not in body:
        raise invalid("`inputs` is required", param="inputs")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid("`parameters` must be an object", param="parameters")
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise invalid("`options` must be an object", param="options")
    extra = {k: v for k, v in body.items() if k not in ("inputs", "parameters", "options")}
    parsed = hf_tasks.PARSERS[task](entry, body["inputs"], params, extra)
    return parsed, parse(HFOptions, options or {}, where="options")


async def run_hf_task(request: Request, model: str, task: str | None, provider: str | None = None):
    """The task's answer; the caller and its dialect are plain calls here (deps: the cached path).
    `model` may carry a provider or policy suffix; `provider`: a per-provider path's."""
    ctx, named = call_context_of(request), bool(task)
    services = services_of(request)
    route = routed.route(request, ctx, model, routed.op_of(task or routed.default_task(services, model)), provider)
    if not route.local_only:
        return await routed_hf_task(request, ctx, route, task, (model, provider))
    entry, task = services.models.resolve(route.model_id, task)
    limit = request.app.state.max_body_bytes
    if task in GENERATION_TASKS:  # the TGI dialect: {"inputs": prompt, "parameters", "stream"}
        return await routes_tgi.text_generation(request, ctx, route, await read_json(request, limit))
    if task not in hf_tasks.PARSERS:
        raise MeshError(ErrorCode.UNSUPPORTED_TASK, f"task {task!r} is not served over REST yet", param="task")
    body = await read_hf_body(request, task, limit)
    if isinstance(body, hf_tasks.HFRequest):
        req, options = body, HFOptions()
    else:
        if not named:  # a bare model URL: the body's shape picks among the model's tasks
            task = hf_tasks.task_from_shape(entry, body)
        req, options = hf_request(entry, task, body)
    return await local_answer(request, ctx, entry, task, req, options)


async def local_answer(request: Request, ctx, entry: ModelEntry, task: str, req: hf_tasks.HFRequest, options):
    """The local mesh's answer to a parsed HF task request (from the response cache when it may)."""
    render, dialect = hf_tasks.RENDERERS[task], hf_dialect_of(request)
    answer = await services_of(request).predict.answer(
        ctx, entry, task, req.inputs, req.parameters, lambda result: json_bytes(render(result, req, dialect)),
        variant=dialect.key,
        # The HF API takes the options in the body or, in its newer form, as headers.
        use_cache=header_flag(request, "x-use-cache", options.use_cache, default=True),
        wait=header_flag(request, "x-wait-for-model", options.wait_for_model, default=False),
    )  # fmt: skip
    return Response(answer.content, 200, {"X-Cache": answer.cache, **answer.headers}, media_type="application/json")


async def routed_hf_task(request: Request, ctx, route, task: str | None, asked: tuple[str, str | None]):
    """An HF task request over several providers, or a remote one: generation in the TGI dialect;
    any other task's body goes to a remote provider as it is (its JSON answer back as it is) and,
    when the local mesh is a candidate, parsed for it as the local path parses it. `asked`: the
    model and path provider, to route again when the body's shape picks a task of another op."""
    services = services_of(request)
    named, entry = bool(task), route.entry
    task = task or entry.default_task
    limit = request.app.state.max_body_bytes
    if task in GENERATION_TASKS:
        return await routes_tgi.text_generation(request, ctx, route, await read_json(request, limit))
    raw = await read_bytes(request, limit)
    local = None
    if isinstance(entry, ModelEntry) and task in hf_tasks.PARSERS:
        body = raw_hf_body(request, task, raw)
        if not named and not isinstance(body, hf_tasks.HFRequest):
            shaped = hf_tasks.task_from_shape(entry, body)
            if routed.op_of(shaped) != routed.op_of(task):  # another op: its own providers
                route = routed.route(request, ctx, asked[0], routed.op_of(shaped), asked[1])
                if route.local_only:
                    req, options = hf_request(entry, shaped, body)
                    return await local_answer(request, ctx, entry, shaped, req, options)
            task = shaped
        local = local_task(request, entry, task, body)
    forwarded = {k: v for k in FORWARDED if (v := request.headers.get(k)) is not None}
    if "json" in forwarded.get("content-type", "json"):  # JSON is what the provider gets by default
        forwarded.pop("content-type", None)
    answer = await services.routing.predict(ctx, route, task, raw, local=local, headers=forwarded)
    return Response(answer.content, 200, {"X-Cache": answer.cache, **answer.headers}, media_type="application/json")


def raw_hf_body(request: Request, task: str, raw: bytes):
    """A body read already: JSON, or an HFRequest for a raw image upload (as read_hf_body)."""
    if task in IMAGE_TASKS and "json" not in request.headers.get("content-type", "") and raw.lstrip()[:1] != b"{":
        return hf_tasks.raw_image_request(raw)
    return parse_json(raw)


def local_task(request: Request, entry: ModelEntry, task: str, body):
    """What the local mesh runs of this request, and how its result renders (called only if the
    local mesh is among the candidates: a request it cannot parse is refused as the local path does)."""
    dialect = hf_dialect_of(request)

    def parsed() -> LocalTask:
        req = body if isinstance(body, hf_tasks.HFRequest) else hf_request(entry, task, body)[0]
        render = hf_tasks.RENDERERS[task]
        return LocalTask(req.inputs, req.parameters, lambda result: json_bytes(render(result, req, dialect)))

    return parsed


async def hf_post(request: Request, model_path: str, provider: str | None = None):
    """`POST /models/{id}[:suffix]`, `…/pipeline/{task}`, `…/v1/chat/completions`, TGI's
    `…/generate` and `…/generate_stream`; `provider`:
    a per-provider path's (`/{provider}/models/...`)."""
    if model_path.endswith(CHAT_SUFFIX):  # huggingface_hub's chat_completion on a model URL
        model = model_path.removesuffix(CHAT_SUFFIX)
        return await routes_openai.chat(request, call_context_of(request), model, provider)
    for suffix, stream in routes_tgi.SUFFIXES:  # TGI's /generate and /generate_stream on a model URL
        if model_path.endswith(suffix) and len(model_path) > len(suffix):
            return await routes_tgi.generate(request, model_path.removesuffix(suffix), stream=stream, provider=provider)
    if "/pipeline/" in model_path:
        model_id, task = model_path.rsplit("/pipeline/", 1)
        return await run_hf_task(request, model_id, task, provider)
    return await run_hf_task(request, model_path, None, provider)


@router.post("/models/{model_path:path}", summary="Run a model's task (HF Inference API)", openapi_extra=HF_BODY)
async def hf_model(request: Request, model_path: str):
    return await hf_post(request, model_path)


@router.get("/models/{model_path:path}", summary="Model health (…/health) or info (…/info)")
async def hf_model_get(request: Request, model_path: str):
    models = services_of(request).models
    if model_path.endswith("/health"):
        entry = models.get(model_path.removesuffix("/health"))
        if await models.ready(entry):
            return json_response({"status": "ok"})
        raise MeshError(ErrorCode.MODEL_LOADING, f"Model {entry.id} is not ready")
    if model_path.endswith("/info"):
        entry = models.get(model_path.removesuffix("/info"))
        card = routes_openai.model_card(entry, request.app.state.catalog_created)
        card["max_input_tokens"] = entry.preprocess.max_length
        if entry.default_task in routes_tgi.GENERATION_TASKS:  # TGI's Info, every required field
            card.update(routes_tgi.info(entry))
        return json_response(card)
    raise StarletteHTTPException(404)


@router.post("/v1/models/{model_path:path}", summary="…/predict: run the model's task", openapi_extra=HF_BODY)
async def v1_predict(request: Request, model_path: str):
    if not model_path.endswith("/predict"):
        raise StarletteHTTPException(404)
    return await run_hf_task(request, model_path.removesuffix("/predict"), None)


@no_model_router.post("/")
@no_model_router.post("/v1")
async def no_model(request: Request):
    raise invalid(
        "no model in the URL: point the client at http://<host>:<port>/models/<model id> "
        "(e.g. InferenceClient(model='http://127.0.0.1:8080/models/sentence-transformers/all-MiniLM-L6-v2'))"
    )

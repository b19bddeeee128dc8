"""REST routes: the HF task API, the OpenAI API and operations endpoints, over `Pipeline`.

Model ids contain '/', so model routes take the rest of the path and parse known suffixes from
the right ('%2F' arrives decoded). Errors are rendered in the caller's dialect: `/v1/*` routes
answer OpenAI's `{"error": {message, type, code, param}}`, HF routes `{"error", "error_type"}`.
"""

from __future__ import annotations

import base64
import logging
import time

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from meshserve.tasks.v1 import tasks_pb2
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common import caps, deadlines
from services.common.catalog import GENERATION_TASKS, IMAGE_TASKS, ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.common.ids import new_id
from services.common.metrics import LATENCY_BUCKETS
from services.gateway.api import admin_routes as admin_api
from services.gateway.api import hf_tasks
from services.gateway.api import openai_routes as openai_api
from services.gateway.api.schemas import EmbeddingsRequest, HFOptions, HFTaskRequest, parse
from services.gateway.control.auth import Authenticator, AuthMiddleware
from services.gateway.control.metering import text_token_bound, token_bound
from services.gateway.control.plane import ControlPlane
from services.gateway.pipeline.cache import ResponseCache, cache_key
from services.gateway.pipeline.coalescer import COALESCED_TASKS, Embedded, RequestCoalescer
from services.gateway.pipeline.generation import Generator
from services.gateway.pipeline.runner import Pipeline, Prediction
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter(
    "meshserve_gateway_requests_total", "HTTP requests by route, model and status.", ["route", "model", "status"]
)
HTTP_SECONDS = Histogram(
    "meshserve_gateway_request_seconds", "HTTP request latency by route.", ["route"], buckets=LATENCY_BUCKETS
)
JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


def json_response(content, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content, option=JSON_OPTS), status, headers, media_type="application/json")


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


# What every route may answer besides its success, as the schema documents it (`error_response`).
ERROR_RESPONSES = {
    status: {
        "description": "An error in the route's dialect: OpenAI's `{error: {message, type, code, param}}` under "
        "/v1, the HF API's `{error, error_type}` elsewhere.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "anyOf": [{"type": "string"}, {"type": "object", "required": ["message", "type", "code"]}]
                        }
                    },
                }
            }
        },
    }
    for status in ("4XX", "5XX")
}


def error_response(err: MeshError, path: str) -> Response:
    headers = dict(err.headers)
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
    if is_openai_path(path):
        body = {
            "error": {"message": err.message, "type": err.code.openai_type, "code": err.code.slug, "param": err.param}
        }
    else:
        body = {"error": err.message, "error_type": err.code.hf_type}
        if err.estimated_time_s is not None:
            body["estimated_time"] = err.estimated_time_s  # the HF API's field for a loading model
    return json_response(body, err.code.http_status, headers)


async def read_bytes(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise MeshError(ErrorCode.PAYLOAD_TOO_LARGE, f"request body of {length} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise MeshError(ErrorCode.PAYLOAD_TOO_LARGE, f"request body exceeds the limit of {limit} bytes")
    if not body:
        raise invalid("request body is empty: send a JSON object")
    return bytes(body)


async def read_json(request: Request, limit: int):
    return parse_json(await read_bytes(request, limit))


def parse_json(body: bytes):
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from None


def header_flag(request: Request, name: str, option: bool | None, *, default: bool) -> bool:
    """An HF option from its header form (X-Use-Cache: false), else the body's `options`."""
    value = request.headers.get(name)
    if value is not None:
        return value.strip().lower() in ("1", "true", "yes")
    return default if option is None else option


def model_card(entry: ModelEntry, created: int, ready: bool | None = None) -> dict:
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


def _route_label(path: str) -> str:
    for prefix in (
        "/admin",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/usage",
        "/v1/embeddings",
        "/v1/models",
        "/models",
        "/metrics",
        "/readyz",
        "/health",
        "/docs",
        "/openapi.json",
    ):
        if path.startswith(prefix):
            return prefix
    return "other"


class RequestContextMiddleware:
    """Pure ASGI: X-Request-Id on every response, per-request deadline, metrics.

    The request id is the gateway's own (unique across replicas, the ledger row's id): a caller's
    id could be forged or reused, so it is kept beside ours (`client_request_id` in the ledger)
    and echoed as X-Client-Request-Id. The caller may send it as X-Client-Request-Id (OpenAI's
    name) or X-Request-Id."""

    def __init__(self, app, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client_id = None
        for key, value in scope["headers"]:
            if key == b"x-client-request-id" or (key == b"x-request-id" and client_id is None):
                client_id = value[:128]
        request_id = new_id().encode()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id.decode()
        state["client_request_id"] = client_id.decode("latin-1") if client_id else None
        id_headers = [(b"x-request-id", request_id)]
        if client_id:
            id_headers.append((b"x-client-request-id", client_id))
        started = time.perf_counter()
        status, responded = 500, False

        async def send_with_id(message):
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                message["headers"] = [*message.get("headers", []), *id_headers]
            await send(message)

        token = deadlines.set_absolute(time.monotonic() + self.timeout_s)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette re-raises after its Exception handler has logged the error and answered a
            # generic 500 in the caller's dialect; only answer if nothing was sent yet.
            if not responded:
                log.exception("unhandled error before the response started")
                response = error_response(MeshError(ErrorCode.INTERNAL, "internal error"), scope["path"])
                await response(scope, receive, send_with_id)
        finally:
            deadlines.reset(token)
            route = _route_label(scope["path"])
            HTTP_SECONDS.labels(route).observe(time.perf_counter() - started)
            HTTP_REQUESTS.labels(route, scope.get("state", {}).get("model", ""), str(status)).inc()


def create_app(
    settings: GatewaySettings,
    pipeline: Pipeline,
    *,
    coalescer: RequestCoalescer | None = None,
    control: ControlPlane | None = None,
    is_draining=lambda: False,
) -> FastAPI:
    app = FastAPI(
        title="meshserve",
        version="0.1.0",
        description="Self-hosted inference API: Hugging Face task API and OpenAI-compatible routes.",
        # Traces come from opentelemetry-instrumentation-fastapi (gateway/main.py) when tracing is on.
        # FastAPI's own telemetry would add a second server span, and while no provider is set it
        # looks one up in os.environ on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        responses=ERROR_RESPONSES,
    )
    catalog = pipeline.catalog
    created = int(settings.catalog.stat().st_mtime)
    limit = settings.max_body_bytes
    cache = ResponseCache(
        max_bytes=settings.cache_max_bytes,
        max_entry_bytes=settings.cache_max_entry_bytes,
        ttl_s=settings.cache_ttl_s,
        shared=settings.cache_shared,
    )
    control = control or ControlPlane.disabled(settings)
    metering = control.metering

    async def admit(
        request: Request,
        entry: ModelEntry,
        task: str,
        max_input_tokens: int,
        max_output_tokens: int = 0,
        tokens_hint: int | None = None,
    ):
        principal = getattr(request.state, "principal", None) or Authenticator.ANONYMOUS
        return await metering.admit(
            principal,
            entry,
            task,
            _route_label(request.url.path),
            request.state.request_id,
            max_input_tokens=max_input_tokens,
            max_output_tokens=max_output_tokens,
            tokens_hint=tokens_hint,
            client_request_id=request.state.client_request_id,
        )

    generation = openai_api.register(
        app,
        catalog,
        Generator(pipeline.preprocess, pipeline.inference, pipeline.postprocess),
        admit,
        metering,
        read_json,
        json_response,
    )

    async def embed(model_id: str, texts: list[str], parameters: tasks_pb2.TaskParameters) -> Embedded:
        if coalescer is not None:
            return await coalescer.embed(model_id, texts, parameters)
        prediction: Prediction = await pipeline.predict(
            model_id, "feature-extraction", tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=texts)), parameters
        )
        return Embedded.of(prediction)

    @app.exception_handler(MeshError)
    async def _mesh_error(request: Request, err: MeshError):
        if err.code.server_fault:
            log.warning("request failed", extra={"fields": {"code": err.code.slug, "error": err.message}})
        return error_response(err, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.INVALID_INPUT}.get(exc.status_code, ErrorCode.INVALID_INPUT)
        message = "route not found" if exc.status_code == 404 else str(exc.detail)
        response = error_response(MeshError(code, f"{message}: {request.method} {request.url.path}"), request.url.path)
        response.status_code = exc.status_code
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid_parameter(request: Request, exc: RequestValidationError):
        # FastAPI's own check of query and path parameters (GET /v1/usage?limit=x): a caller's mistake,
        # answered 400 in the caller's dialect like every other, not FastAPI's 422 {"detail": [...]}.
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        err = invalid(f"`{param}`: {first.get('msg', 'invalid value')}", param=param)
        return error_response(err, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled error", exc_info=exc)
        return error_response(MeshError(ErrorCode.INTERNAL, "internal error"), request.url.path)

    # -- operations ---------------------------------------------------------------------------
    @app.get("/health", tags=["operations"], summary="Liveness")
    @app.get("/healthz", tags=["operations"], summary="Liveness", include_in_schema=False)
    async def health():
        return json_response({"status": "ok"})

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness of every downstream hop",
        responses={503: {"description": "Not ready, or draining: `{status, checks}` as for 200"}},
    )
    async def readyz():
        if is_draining():
            return json_response({"status": "draining"}, 503, {"Retry-After": "1"})
        readiness = await pipeline.readiness()
        status = 200 if readiness.ready else 503
        headers = None if readiness.ready else {"Retry-After": "1"}
        return json_response(
            {"status": "ready" if readiness.ready else "unavailable", "checks": readiness.checks}, status, headers
        )

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI --------------------------------------------------------------------------------
    @app.get("/v1/models", tags=["openai"], summary="List models")
    async def list_models():
        return json_response({"object": "list", "data": [model_card(e, created) for e in catalog.models]})

    @app.get("/v1/models/{model_path:path}", tags=["openai"], summary="Describe one model ('/' or %2F in the id)")
    async def get_model(model_path: str):
        entry = catalog.get(model_path)
        card = model_card(entry, created, await pipeline.model_ready(entry))
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

    @app.post(
        "/v1/embeddings",
        tags=["openai"],
        summary="Create embeddings (OpenAI)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EmbeddingsRequest.model_json_schema()}},
            }
        },
    )
    async def embeddings(request: Request):
        body = parse(EmbeddingsRequest, await read_json(request, limit))
        entry = catalog.get(body.model)
        request.state.model = entry.id
        if isinstance(body.input, list) and body.input and not isinstance(body.input[0], str):
            raise invalid("token-id arrays are not supported as `input`; send text", param="input")
        texts, _ = hf_tasks.texts(body.input, "input")
        caps.check_texts(entry, texts, field="input")
        hf_tasks.check_dimensions(entry, body.dimensions)
        metered = await admit(request, entry, "feature-extraction", text_token_bound(entry, texts))
        async with metering.track(metered):
            # OpenAI refuses over-long input rather than cutting it.
            result = await embed(entry.id, texts, tasks_pb2.TaskParameters(truncate=False))
            metered.add(input_tokens=result.input_tokens, items=len(texts), compute_s=result.compute_s)
        vectors = result.vectors
        if body.encoding_format == "base64":
            values = [base64.b64encode(row.tobytes()).decode() for row in vectors]  # little-endian float32
        else:
            values = list(vectors)
        tokens = result.input_tokens
        return json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)],
                "model": entry.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers=metered.headers(),
        )

    # -- HF task API ---------------------------------------------------------------------------
    async def read_hf_body(request: Request, task: str):
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

    async def execute_hf(entry: ModelEntry, task: str, req: hf_tasks.HFRequest, wait: bool, dialect, metered):
        """Run one parsed HF request; records its usage on `metered`; returns the JSON content."""
        items = {"text": lambda i: len(i.text.texts), "images": lambda i: len(i.images.images)}.get(
            req.inputs.WhichOneof("kind"), lambda i: 1
        )(req.inputs)
        coalesce = task in COALESCED_TASKS and coalescer is not None and not wait
        if coalesce:  # merged with concurrent requests (the coalescer does not wait for cold models)
            share = await coalescer.run(entry.id, task, list(req.inputs.text.texts), req.parameters)
            metered.add(input_tokens=share.input_tokens, items=items, compute_s=share.compute_s)
            if task == "feature-extraction":
                return share.vectors[0] if req.single else share.vectors
            result = tasks_pb2.TaskResult(classifications=tasks_pb2.Classifications(items=share.items))
        else:
            prediction = await pipeline.predict(entry.id, task, req.inputs, req.parameters, wait_for_model=wait)
            metered.add(input_tokens=prediction.usage.input_tokens, items=items, compute_s=prediction.compute_s)
            if task == "feature-extraction":
                vectors = Embedded.of(prediction).vectors
                return vectors[0] if req.single else vectors
            result = prediction.result
        return hf_tasks.RENDERERS[task](result, req, dialect)

    async def run_hf_task(request: Request, model_id: str, task: str | None):
        named = bool(task)
        entry, task = pipeline.resolve(model_id, task)
        request.state.model = entry.id
        if task in GENERATION_TASKS:  # the TGI dialect: {"inputs": prompt, "parameters", "stream"}
            return await generation["text_generation"](request, entry, await read_json(request, limit))
        if task not in hf_tasks.PARSERS:
            raise MeshError(ErrorCode.UNSUPPORTED_TASK, f"task {task!r} is not served over REST yet", param="task")
        body = await read_hf_body(request, task)
        if isinstance(body, hf_tasks.HFRequest):
            req, options = body, HFOptions()
        else:
            if not named:  # a bare model URL: the body's shape picks among the model's tasks
                task = hf_tasks.task_from_shape(entry, body)
            req, options = hf_request(entry, task, body)
        # The HF API takes the options in the body or, in its newer form, as headers.
        use_cache = header_flag(request, "x-use-cache", options.use_cache, default=True)
        wait = header_flag(request, "x-wait-for-model", options.wait_for_model, default=False)
        dialect = hf_tasks.Dialect.from_user_agent(request.headers.get("user-agent", ""))
        metered = await admit(request, entry, task, token_bound(entry, req.inputs, req.parameters))
        async with metering.track(metered):
            scope = cache.scope_of(metered.principal.key_id)  # a key never sees another's entries
            key = cache_key(entry.id, task, req.inputs, req.parameters, dialect.key, scope)
            cached = cache.get(entry.id, key) if use_cache else None
            if cached is not None:
                state = "HIT"
                content = cached
            else:
                state = "MISS" if use_cache else "BYPASS"
                content = orjson.dumps(await execute_hf(entry, task, req, wait, dialect, metered), option=JSON_OPTS)
                cache.put(key, content)
        headers = {"X-Cache": state, **metered.headers()}
        return Response(content, 200, headers, media_type="application/json")

    hf_body = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": HFTaskRequest.model_json_schema()}},
        }
    }

    @app.post(
        "/models/{model_path:path}",
        tags=["huggingface"],
        summary="Run a model's task (HF Inference API)",
        openapi_extra=hf_body,
    )
    async def hf_model(request: Request, model_path: str):
        if model_path.endswith("/v1/chat/completions"):  # huggingface_hub's chat_completion on a model URL
            return await generation["chat"](request, model_path.removesuffix("/v1/chat/completions"))
        if "/pipeline/" in model_path:
            model_id, task = model_path.rsplit("/pipeline/", 1)
            return await run_hf_task(request, model_id, task)
        return await run_hf_task(request, model_path, None)

    @app.get("/models/{model_path:path}", tags=["huggingface"], summary="Model health (…/health) or info (…/info)")
    async def hf_model_get(model_path: str):
        if model_path.endswith("/health"):
            entry = catalog.get(model_path.removesuffix("/health"))
            if await pipeline.model_ready(entry):
                return json_response({"status": "ok"})
            raise MeshError(ErrorCode.MODEL_LOADING, f"Model {entry.id} is not ready")
        if model_path.endswith("/info"):
            entry = catalog.get(model_path.removesuffix("/info"))
            return json_response({**model_card(entry, created), "max_input_tokens": entry.preprocess.max_length})
        raise StarletteHTTPException(404)

    @app.post(
        "/v1/models/{model_path:path}",
        tags=["huggingface"],
        summary="…/predict: run the model's task",
        openapi_extra=hf_body,
    )
    async def v1_predict(request: Request, model_path: str):
        if not model_path.endswith("/predict"):
            raise StarletteHTTPException(404)
        return await run_hf_task(request, model_path.removesuffix("/predict"), None)

    admin_api.register(app, control, json_response, read_json)

    @app.post("/", include_in_schema=False)
    @app.post("/v1", include_in_schema=False)
    async def no_model(request: Request):
        raise invalid(
            "no model in the URL: point the client at http://<host>:<port>/models/<model id> "
            "(e.g. InferenceClient(model='http://127.0.0.1:8080/models/sentence-transformers/all-MiniLM-L6-v2'))"
        )

    return app


def wrap(app: FastAPI, settings: GatewaySettings, auth: Authenticator | None = None):
    """The ASGI app that is served: request context (id, deadline, metrics) outermost, then
    authentication (so a 401 carries X-Request-Id and is counted), then FastAPI."""
    inner = AuthMiddleware(app, auth, error_response) if auth is not None and auth.enabled else app
    return RequestContextMiddleware(inner, settings.request_timeout_s)

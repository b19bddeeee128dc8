"""The REST app: FastAPI with the error handlers of the caller's dialect and the routers of each
dialect (OpenAI, operations, HF/TGI, admin) over the service layer; `wrap` adds the request
context and authentication around it (what uvicorn serves), and the HF task route's fast path."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi_offline import FastAPIOffline

from services.gateway.api import (
    docs,
    routes_admin,
    routes_embeddings,
    routes_hf,
    routes_openai,
    routes_ops,
    routes_providers,
    routes_rerank,
    routes_tei,
    routes_tgi,
    routes_tokenize,
)
from services.gateway.api.errors import ERROR_RESPONSES, error_response, install_error_handlers
from services.gateway.api.request_context import RequestContextMiddleware
from services.gateway.control.auth import Authenticator, AuthMiddleware
from services.gateway.service import GatewayServices
from services.gateway.settings import GatewaySettings

# In this order: the schema's paths keep the order they have always had; the per-provider paths
# (`/{provider}/...`) last, so that every existing path wins over them.
ROUTERS = (
    routes_openai.generation_router,
    routes_ops.router,
    routes_openai.router,
    routes_embeddings.router,
    routes_hf.router,
    routes_admin.router,
    routes_rerank.router,
    routes_tokenize.router,
    routes_tei.router,
    routes_tgi.router,
    routes_hf.no_model_router,
    routes_providers.router,
)


def create_app(
    settings: GatewaySettings, services: GatewayServices, *, is_draining: Callable[[], bool] = lambda: False
) -> FastAPI:
    app = FastAPIOffline(  # Swagger UI and ReDoc from local assets (api/docs.py)
        title="meshserve",
        version="0.1.0",
        description="Self-hosted inference API: Hugging Face task API and OpenAI-compatible routes.",
        # Traces come from opentelemetry-instrumentation-fastapi (gateway/main.py) when tracing is on.
        # FastAPI's own telemetry would add a second server span, and while no provider is set it
        # looks one up in os.environ on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        responses=ERROR_RESPONSES,
    )
    app.state.services = services
    app.state.is_draining = is_draining
    app.state.max_body_bytes = settings.max_body_bytes
    app.state.catalog_created = int(settings.catalog.stat().st_mtime)  # the models' `created`
    install_error_handlers(app)
    for router in ROUTERS:
        add_routes(app, router)
    docs.install(app, metrics_public=settings.metrics_public)
    return app


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """The router's routes, added to the app itself. Not `include_router`: fastapi 0.165 keeps an
    included router as a nested matcher resolved on every request, about 200 more Python calls on
    the cached HF path (measured with cProfile); routes of the app are matched directly."""
    for route in router.routes:
        app.add_api_route(
            route.path,
            route.endpoint,
            methods=route.methods,
            tags=route.tags,
            summary=route.summary,
            responses=route.responses,
            response_class=route.response_class,
            include_in_schema=route.include_in_schema,
            openapi_extra=route.openapi_extra,
            name=route.name,
        )


HF_TASK_PREFIX = "/models/"
# Exact paths whose endpoints also take only the request (nothing for FastAPI to parse) and go
# straight to them: `POST /v1/embeddings`, the other hot unary route (#18: ~8 % of the gateway's
# samples at c=1 were FastAPI's routing and middleware on it, py-spy), and the two OpenAI
# generation routes (~12 % of the gateway's samples per streamed chat request, py-spy at 32
# streams: what 32 requests arriving together queue behind).
FAST_EXACT = {
    "/v1/embeddings": routes_embeddings.embeddings,
    "/v1/chat/completions": routes_openai.chat_completions,
    "/v1/completions": routes_openai.completions,
}


class HfTaskFastPath:
    """Pure ASGI: `POST /models/{model_path:path}` (the HF task API, the hot route) goes straight to
    its endpoint, `routes_hf.hf_post`, and the FAST_EXACT paths to theirs; everything else to FastAPI. FastAPI's route matching, its
    middleware stack and its endpoint wrapper cost about a quarter of the gateway's CPU per request
    on this route (py-spy, digits at c=64); the endpoint takes no parameters FastAPI would parse.

    Errors go through the app's own exception handlers, as Starlette would send them: the handler
    of the exception's class (MeshError, HTTPException...) answers; an unexpected exception is
    answered by the `Exception` handler and re-raised, as ServerErrorMiddleware does. Not used
    while tracing is on (the OpenTelemetry middleware lives in FastAPI's stack)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        exact = FAST_EXACT.get(path)
        if exact is None and not path.startswith(HF_TASK_PREFIX):
            return await self.app(scope, receive, send)
        scope["app"] = self.app
        request = Request(scope, receive, send)
        started = False

        async def sender(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            if exact is not None:
                response = await exact(request)
            else:
                response = await routes_hf.hf_post(request, path[len(HF_TASK_PREFIX) :])
            await response(scope, receive, sender)
        except Exception as exc:
            await self._failed(request, exc, started, sender)

    async def _failed(self, request: Request, exc: Exception, started: bool, send) -> None:
        handlers = self.app.exception_handlers
        handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers and c is not Exception), None)
        if handler is not None and not started:
            exc.__traceback__ = None  # as Starlette: a reused exception must not grow its traceback
            return await (await handler(request, exc))(request.scope, request.receive, send)
        unexpected = handlers.get(Exception)
        if unexpected is not None:  # logs it; answers when nothing was sent yet
            response = await unexpected(request, exc)
            if not started:
                await response(request.scope, request.receive, send)
        raise exc


def wrap(app: FastAPI, settings: GatewaySettings, auth: Authenticator | None = None, *, fast_path: bool = True):
    """The ASGI app that is served: request context (id, deadline, metrics) outermost, then
    authentication (so a 401 carries X-Request-Id and is counted), then the HF task route's fast
    path (`fast_path`: off while tracing, whose middleware is FastAPI's), then FastAPI."""
    inner = HfTaskFastPath(app) if fast_path else app
    inner = AuthMiddleware(inner, auth, error_response) if auth is not None and auth.enabled else inner
    return RequestContextMiddleware(inner, settings.request_timeout_s)

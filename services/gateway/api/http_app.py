"""The REST app: FastAPI with the error handlers of the caller's dialect and the routers of each
dialect (OpenAI, operations, HF/TGI, admin) over the service layer; `wrap` adds the request
context and authentication around it (what uvicorn serves)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, FastAPI

from services.gateway.api import routes_admin, routes_hf, routes_openai, routes_ops, routes_providers, routes_rerank
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
    routes_hf.router,
    routes_admin.router,
    routes_rerank.router,
    routes_hf.no_model_router,
    routes_providers.router,
)


def create_app(
    settings: GatewaySettings, services: GatewayServices, *, is_draining: Callable[[], bool] = lambda: False
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
    app.state.services = services
    app.state.is_draining = is_draining
    app.state.max_body_bytes = settings.max_body_bytes
    app.state.catalog_created = int(settings.catalog.stat().st_mtime)  # the models' `created`
    install_error_handlers(app)
    for router in ROUTERS:
        add_routes(app, router)
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


def wrap(app: FastAPI, settings: GatewaySettings, auth: Authenticator | None = None):
    """The ASGI app that is served: request context (id, deadline, metrics) outermost, then
    authentication (so a 401 carries X-Request-Id and is counted), then FastAPI."""
    inner = AuthMiddleware(app, auth, error_response) if auth is not None and auth.enabled else app
    return RequestContextMiddleware(inner, settings.request_timeout_s)

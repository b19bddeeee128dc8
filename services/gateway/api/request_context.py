"""The outermost layer of every HTTP request (pure ASGI): the gateway's request id (X-Request-Id)
and the caller's own, the request's deadline, its route label, and the HTTP metrics."""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram

from services.common import deadlines
from services.common.errors import ErrorCode, MeshError
from services.common.ids import new_id
from services.common.metrics import LATENCY_BUCKETS
from services.gateway.api.errors import error_response

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter(
    "meshserve_gateway_requests_total", "HTTP requests by route, model and status.", ["route", "model", "status"]
)
HTTP_SECONDS = Histogram(
    "meshserve_gateway_request_seconds", "HTTP request latency by route.", ["route"], buckets=LATENCY_BUCKETS
)
ROUTE_PREFIXES = (
    "/admin",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/usage",
    "/v1/embeddings",
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/v1/models",
    "/models",
    "/metrics",
    "/readyz",
    "/health",
    "/docs",
    "/openapi.json",
)


# Metric children by label values, so a request does not pay `.labels(...)` (a lock, argument
# checks and a dict lookup each) twice. The values are bounded sets; the cache is bounded anyway.
_CHILDREN_MAX = 4096
_seconds_of: dict[str, object] = {}
_requests_of: dict[tuple[str, str, int], object] = {}


def _observe(route: str, model: str, status: int, seconds: float) -> None:
    timer = _seconds_of.get(route)
    if timer is None:
        timer = _seconds_of[route] = HTTP_SECONDS.labels(route)
    counter = _requests_of.get((route, model, status))
    if counter is None:
        if len(_requests_of) >= _CHILDREN_MAX:
            _requests_of.clear()
        counter = _requests_of[(route, model, status)] = HTTP_REQUESTS.labels(route, model, str(status))
    timer.observe(seconds)
    counter.inc()


# A per-provider path (`/{provider}/v1/chat/completions`, `/{provider}/models/{id}`) is labelled
# with the placeholder, not the name: providers come and go, labels must stay a bounded set.
PROVIDER_ROUTE_PREFIXES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/models")


def route_label(path: str) -> str:
    """The route a path belongs to, for metrics and the ledger (a bounded set of values)."""
    for prefix in ROUTE_PREFIXES:
        if path.startswith(prefix):
            return prefix
    slash = path.find("/", 1)
    if slash > 1:
        rest = path[slash:]
        for prefix in PROVIDER_ROUTE_PREFIXES:
            if rest.startswith(prefix):
                return "/{provider}" + prefix
    return "other"


class RequestContextMiddleware:
    """Pure ASGI: X-Request-Id on every response, per-request deadline, metrics.

    The request id is the gateway's own (unique across replicas, the ledger row's id): a caller's
    id could be forged or reused, so it is kept beside ours (`client_request_id` in the ledger)
    and echoed as X-Client-Request-Id. The caller may send it as X-Client-Request-Id (OpenAI's
    name) or X-Request-Id. The request state gets `request_id`, `client_request_id` and `route`."""

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
        route = route_label(scope["path"])
        state = scope.setdefault("state", {})
        state["request_id"] = request_id.decode()
        state["client_request_id"] = client_id.decode("latin-1") if client_id else None
        state["route"] = route
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
            _observe(route, scope.get("state", {}).get("model", ""), status, time.perf_counter() - started)

"""Who is calling, for the routes: the key's principal, the request's ids and route label as a
service-layer CallContext, and the HF client's dialect; and the use cases, built once per app
and kept on `app.state`.

Each is a plain function of the request (`*_of`) and, for `Depends`, an async one. A FastAPI
dependency costs about 45 Python calls per request (fastapi 0.165, measured with cProfile on the
cached HF path), so the HF task routes, whose cached answers take a few hundred of them, call the
plain functions; the other routes declare them with `Depends`."""

from __future__ import annotations

from fastapi import Request

from services.gateway.api.hf_tasks import Dialect
from services.gateway.control.auth import Authenticator, Principal
from services.gateway.service import GatewayServices
from services.gateway.service.context import CallContext

ANONYMOUS = Authenticator.ANONYMOUS


def services_of(request: Request) -> GatewayServices:
    """The app's use cases (create_app puts them on app.state)."""
    return request.app.state.services


def principal_of(request: Request) -> Principal:
    """The caller's key, as AuthMiddleware found it (anonymous with auth off)."""
    state = request.scope.get("state")
    return (state.get("principal") if state else None) or ANONYMOUS


def call_context_of(request: Request) -> CallContext:
    """The key and the ids RequestContextMiddleware gave the request."""
    state = request.scope["state"]
    return CallContext(
        state.get("principal") or ANONYMOUS, state["request_id"], state["route"], state["client_request_id"]
    )


def hf_dialect_of(request: Request) -> Dialect:
    """What the HF answer's shape depends on besides the request: the client's version."""
    return Dialect.from_user_agent(request.headers.get("user-agent", ""))


async def principal(request: Request) -> Principal:
    return principal_of(request)


async def call_context(request: Request) -> CallContext:
    return call_context_of(request)

"""Who may call what: bearer tokens on every REST route and gRPC method, checked before routing.

Secure by default: a route needs a valid token unless it is listed as public here, and a route
this table does not know needs the `admin` scope, so a new route is locked down until someone
decides otherwise (the route-walk test covers every route the app registers). Keys may also be
limited to some models and tasks; those are checked where the model is resolved.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

import grpc

from services.common.errors import ErrorCode, MeshError
from services.gateway.keys import ApiKey, KeyStore

# (method, path regex) -> scope; None = public. First match wins; no match = "admin".
REST_SCOPES: tuple[tuple[str, re.Pattern, str | None], ...] = tuple(
    (method, re.compile(pattern), scope)
    for method, pattern, scope in (
        ("GET", r"/(health|healthz|readyz)", None),
        ("GET", r"/metrics", "metrics"),  # public or `read`, per settings.metrics_public
        ("GET", r"/(docs|docs/oauth2-redirect|openapi\.json|redoc)", "read"),
        ("GET", r"/v1/models(/.*)?", "read"),
        ("GET", r"/models/.+/(health|info)", "read"),
        ("GET", r"/v1/usage", "read"),
        ("POST", r"/v1/(embeddings|chat/completions|completions)", "inference"),
        ("POST", r"/v1/models/.+/predict", "inference"),
        ("POST", r"/models/.+", "inference"),
        ("POST", r"/(v1)?", "inference"),
        ("GET", r"/admin/keys", "admin"),
        ("POST", r"/admin/keys", "admin"),
        ("DELETE", r"/admin/keys/.+", "admin"),
    )
)
GRPC_SCOPES = {
    "/meshserve.gateway.v1.GatewayService/Predict": "inference",
    "/meshserve.gateway.v1.GatewayService/ListModels": "read",
    "/meshserve.gateway.v1.GatewayService/GetModel": "read",
    "/meshserve.gateway.v1.GatewayService/Generate": "inference",
}
GRPC_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def rest_scope(method: str, path: str, *, metrics_public: bool) -> str | None:
    method = "GET" if method == "HEAD" else method
    for want, pattern, scope in REST_SCOPES:
        if want == method and pattern.fullmatch(path):
            if scope == "metrics":
                return None if metrics_public else "read"
            return scope
    return "admin"


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    key: ApiKey

    @property
    def key_id(self) -> str:
        return self.key.id

    def require(self, scope: str) -> None:
        if not self.key.has_scope(scope):
            raise MeshError(ErrorCode.PERMISSION_DENIED, f"this API key lacks the `{scope}` scope")

    def allow(self, model_id: str, task: str) -> None:
        """Model and task restrictions of the key (empty lists allow everything)."""
        if self.key.models and model_id not in self.key.models:
            raise MeshError(ErrorCode.PERMISSION_DENIED, f"this API key may not use model {model_id!r}", param="model")
        if self.key.tasks and task not in self.key.tasks:
            raise MeshError(ErrorCode.PERMISSION_DENIED, f"this API key may not run task {task!r}", param="task")


# The principal of the gRPC call being handled (set by GrpcAuthInterceptor).
PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("meshserve_principal", default=None)


class Authenticator:
    """Token -> Principal, and the scope a route or method needs. `enabled=False` (--no-auth) lets
    every call through as an anonymous principal with every scope."""

    ANONYMOUS = Principal(ApiKey(id="", name="anonymous (auth off)", scopes=("admin",)))

    def __init__(self, keys: KeyStore | None, *, enabled: bool, metrics_public: bool) -> None:
        self.keys = keys
        self.enabled = enabled
        self.metrics_public = metrics_public
        self._principals: dict[str, Principal] = {}  # key id -> the Principal of its current view

    async def principal(self, token: str | None, scope: str) -> Principal:
        if not self.enabled:
            return self.ANONYMOUS
        if not token:
            raise MeshError(ErrorCode.UNAUTHENTICATED, "missing API key: send `Authorization: Bearer <token>`")
        await self.keys.refresh_for(token)
        key = self.keys.authenticate(token)
        principal = self._principals.get(key.id)
        if principal is None or principal.key is not key:  # new, or the key changed: a new view
            principal = self._principals[key.id] = Principal(key)
        principal.require(scope)
        return principal


class AuthMiddleware:
    """Pure ASGI: authenticates before routing, so unknown paths and every registered route are
    covered alike; puts the Principal into the request state."""

    def __init__(self, app, auth: Authenticator, render_error) -> None:
        self.app = app
        self.auth = auth
        self.render_error = render_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        needed = rest_scope(scope["method"], scope["path"], metrics_public=self.auth.metrics_public)
        if needed is not None:
            token = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    token = bearer(value.decode("latin-1"))
                    break
            try:
                principal = await self.auth.principal(token, needed)
            except MeshError as err:
                response = self.render_error(err, scope["path"])
                if err.code is ErrorCode.UNAUTHENTICATED:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="meshserve"'
                return await response(scope, receive, send)
            scope.setdefault("state", {})["principal"] = principal
        return await self.app(scope, receive, send)


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """The same check for the typed gRPC API: `authorization: Bearer <token>` metadata. Installed
    inside the error-mapping interceptor (create_server's `inner_interceptors`)."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        if method.startswith(GRPC_PUBLIC_PREFIXES) or not self.auth.enabled:
            return await continuation(details)
        token = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                token = bearer(value)
        try:
            principal = await self.auth.principal(token, GRPC_SCOPES.get(method, "admin"))
        except MeshError as err:
            return _refusal(err)
        handler = await continuation(details)
        return _with_principal(handler, principal)


def _refusal(err: MeshError):
    """A handler that fails with the error (error mapping, outside this interceptor, renders it)."""

    async def refuse(request, context):
        raise err

    return grpc.unary_unary_rpc_method_handler(refuse)


def _with_principal(handler, principal: Principal):
    """Run the handler with the principal in a contextvar (the servicer reads it)."""
    if handler is None:
        return handler
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def call(request, context):
            token = PRINCIPAL.set(principal)
            try:
                return await inner(request, context)
            finally:
                PRINCIPAL.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request, context):
            PRINCIPAL.set(principal)  # this generator runs in its own task: no reset needed
            async for item in inner_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
    raise MeshError(ErrorCode.NOT_IMPLEMENTED, "streaming requests are not authenticated here")

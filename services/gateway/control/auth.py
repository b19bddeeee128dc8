"""Who may call what: bearer tokens on every REST route and gRPC method, checked before routing.

Secure by default: a route needs a valid token unless it is listed as public here, and a route
this table does not know needs the `admin` scope, so a new route is locked down until someone
decides otherwise (the route-walk test covers every route the app registers). Keys may also be
limited to some models and tasks; those are checked where the model is resolved.

Every authenticated call counts against its key's requests per minute: inference routes in
metering's admission (with their tokens, budget and concurrency), every other route (reads, admin)
here, right after authentication, in the same window (`Authenticator.count_request`).
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

from services.common.errors import ErrorCode, MeshError
from services.gateway.control.keys import ApiKey, KeyStore
from services.gateway.control.store import ControlStore, KeyLimits

# (method, path regex) -> scope; None = public. First match wins; no match = "admin".
REST_SCOPES: tuple[tuple[str, re.Pattern, str | None], ...] = tuple(
    (method, re.compile(pattern), scope)
    for method, pattern, scope in (
        ("GET", r"/(health|healthz|readyz)", None),
        ("GET", r"/metrics", "metrics"),  # public or `read`, per settings.metrics_public
        # The API's documentation, public (api/docs.py): a browser opens it without a key.
        ("GET", r"/(docs|docs/oauth2-redirect|openapi\.json|redoc|static-offline-docs/[A-Za-z0-9._-]+)", None),
        ("GET", r"/v1/models(/.*)?", "read"),
        ("GET", r"/models/.+/(health|info)", "read"),
        ("GET", r"/v1/usage", "read"),
        ("GET", r"/info", "read"),  # TEI's /info (routes_tei)
        ("GET", r"/(tei|tgi)/.+", "read"),  # a model's TEI / TGI base URL: /info
        ("POST", r"/(tokenize|detokenize|embed|embed_all)", "inference"),  # vLLM's and TEI's root routes
        ("POST", r"/(tei|tgi)/.+", "inference"),
        ("POST", r"/tiktoken/v1/embeddings", "inference"),
        ("POST", r"/v1/(embeddings|chat/completions|completions)", "inference"),
        ("POST", r"/v1/models/.+/predict", "inference"),
        ("POST", r"/models/.+", "inference"),
        ("POST", r"/(v1)?", "inference"),
        ("POST", r"/(rerank|v1/rerank|v2/rerank)", "inference"),
        # One provider's routes (docs/providers.md): /{provider}/v1/... and /{provider}/models/{id}.
        ("POST", r"/[a-z0-9][a-z0-9._-]{0,63}/v1/(embeddings|chat/completions|completions)", "inference"),
        ("POST", r"/[a-z0-9][a-z0-9._-]{0,63}/models/.+", "inference"),
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
    limits: KeyLimits | None = field(init=False, repr=False)  # None: no rate limit on this key
    # What a route that is not metered (reads, admin) counts: one request, no tokens, no slot.
    request_limits: KeyLimits | None = field(init=False, repr=False)
    allowed_providers: frozenset[str] | None = field(init=False, repr=False)  # None: every provider

    def __post_init__(self) -> None:
        key = self.key
        limits = KeyLimits(key.requests_per_minute, key.tokens_per_minute, key.concurrent_requests)
        object.__setattr__(self, "limits", limits if limits != (None, None, None) else None)
        rpm = key.requests_per_minute
        object.__setattr__(self, "request_limits", KeyLimits(rpm) if rpm is not None else None)
        object.__setattr__(self, "allowed_providers", frozenset(key.providers) if key.providers else None)

    @property
    def key_id(self) -> str:
        return self.key.id

    def require(self, scope: str) -> None:
        if not self.key.has_scope(scope):
            raise MeshError(ErrorCode.PERMISSION_DENIED, f"this API key lacks the `{scope}` scope")

    def allow_provider(self, name: str) -> None:
        """The key's provider restriction (an empty list allows every provider)."""
        if self.allowed_providers is not None and name not in self.allowed_providers:
            allowed = ", ".join(sorted(self.allowed_providers))
            raise MeshError(
                ErrorCode.PERMISSION_DENIED,
                f"this API key may not use provider {name!r}; it may use: {allowed}",
                param="model",
            )

    def allow(self, model_id: str, task: str) -> None:
        """Model and task restrictions of the key (empty lists allow everything)."""
        if self.key.models and model_id not in self.key.models:
            raise MeshError(ErrorCode.PERMISSION_DENIED, f"this API key may not use model {model_id!r}", param="model")
        if self.key.tasks and task not in self.key.tasks:
            raise MeshError(ErrorCode.PERMISSION_DENIED, f"this API key may not run task {task!r}", param="task")


_UNKNOWN = object()

# The principal of the gRPC call being handled (set by GrpcAuthInterceptor).
PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("meshserve_principal", default=None)


class Authenticator:
    """Token -> Principal, and the scope a route or method needs. `enabled=False` (--no-auth) lets
    every call through as an anonymous principal with every scope."""

    ANONYMOUS = Principal(ApiKey(id="", name="anonymous (auth off)", scopes=("admin",)))

    # Most credentials remember() keeps (a full cache is emptied: only valid tokens get in).
    MAX_REMEMBERED = 10_000

    def __init__(
        self, keys: KeyStore | None, *, enabled: bool, metrics_public: bool, store: ControlStore | None = None
    ) -> None:
        self.keys = keys
        self.enabled = enabled
        self.metrics_public = metrics_public
        self.store = store  # counts the routes metering does not admit (count_request)
        self._principals: dict[str, Principal] = {}  # key id -> the Principal of its current view
        # The credentials (Authorization values as sent) authenticated with the key view `_view`.
        self._remembered: dict[str | bytes, Principal] = {}
        self._view: object = None

    def remembered(self, credential: str | bytes | None, scope: str) -> Principal | None:
        """The principal of a credential already authenticated with the current key view, if it
        has `scope` and has not expired: one dict lookup instead of parsing, hashing and comparing
        the token again (what the cached path can afford). None: call `principal()`."""
        if not self.enabled:
            return self.ANONYMOUS
        if self.keys.view is not self._view:  # keys were created, changed or revoked: start over
            self._view = self.keys.view
            self._remembered.clear()
            return None
        principal = self._remembered.get(credential)
        if principal is None or not principal.key.has_scope(scope):
            return None
        key = principal.key
        if key.expires_at is not None and not key.active(datetime.now(UTC)):
            return None
        return principal

    def remember(self, credential: str | bytes | None, principal: Principal) -> None:
        """Keep a credential that `principal()` just authenticated (with the view it used)."""
        if not self.enabled or credential is None or self.keys.view is not self._view:
            return
        if len(self._remembered) >= self.MAX_REMEMBERED:
            self._remembered.clear()
        self._remembered[credential] = principal

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

    async def count_request(self, principal: Principal, scope: str) -> dict[str, str]:
        """Count a call of a route that metering does not admit (any scope but `inference`)
        against the key's requests per minute; raises RATE_LIMITED once they are spent. Returns
        the RateLimit headers to send. Such a call takes no tokens and no concurrency slot, so
        nothing needs releasing afterwards."""
        limits = principal.request_limits
        store = self.store
        if scope == "inference" or limits is None or store is None:
            return {}
        key_id = principal.key_id
        return (store.try_admit_now(key_id, limits) or await store.admit(key_id, limits)).headers


class AuthMiddleware:
    """Pure ASGI: authenticates before routing, so unknown paths and every registered route are
    covered alike; puts the Principal into the request state."""

    MAX_ROUTES = 4096  # (method, path) -> scope answers kept

    def __init__(self, app, auth: Authenticator, render_error) -> None:
        self.app = app
        self.auth = auth
        self.render_error = render_error
        self._scopes: dict[tuple[str, str], str | None] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = (scope["method"], scope["path"])
        needed = self._scopes.get(route, _UNKNOWN)
        if needed is _UNKNOWN:
            needed = rest_scope(*route, metrics_public=self.auth.metrics_public)
            if len(self._scopes) >= self.MAX_ROUTES:  # paths are the caller's: bounded
                self._scopes.clear()
            self._scopes[route] = needed
        if needed is not None:
            credential = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    credential = value
                    break
            principal = self.auth.remembered(credential, needed)
            if principal is None:
                try:
                    principal = await self.auth.principal(
                        bearer(credential.decode("latin-1")) if credential else None, needed
                    )
                except MeshError as err:
                    response = self.render_error(err, scope["path"])
                    if err.code is ErrorCode.UNAUTHENTICATED:
                        response.headers["WWW-Authenticate"] = 'Bearer realm="meshserve"'
                    return await response(scope, receive, send)
                self.auth.remember(credential, principal)
            scope.setdefault("state", {})["principal"] = principal
            if needed != "inference" and principal.request_limits is not None:  # (no coroutine on the hot path)
                try:
                    counted = await self.auth.count_request(principal, needed)
                except MeshError as err:
                    return await self.render_error(err, scope["path"])(scope, receive, send)
                if counted:
                    send = _with_headers(send, counted)
        return await self.app(scope, receive, send)


def _with_headers(send, headers: dict[str, str]):
    """`send` that adds headers to the response's start."""
    extra = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

    async def send_with_headers(message):
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    return send_with_headers


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """The same check for the typed gRPC API: `authorization: Bearer <token>` metadata. Installed
    inside the error-mapping interceptor (create_server's `inner_interceptors`)."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        if method.startswith(GRPC_PUBLIC_PREFIXES) or not self.auth.enabled:
            return await continuation(details)
        credential = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                credential = value
        needed = GRPC_SCOPES.get(method, "admin")
        principal = self.auth.remembered(credential, needed)
        if principal is None:
            try:
                principal = await self.auth.principal(bearer(credential), needed)
            except MeshError as err:
                return _refusal(err)
            self.auth.remember(credential, principal)
        if needed != "inference" and principal.request_limits is not None:  # as in AuthMiddleware
            try:
                await self.auth.count_request(principal, needed)
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

"""Service-to-service authentication: one shared token that every internal gRPC call carries.

The stages (preprocess, inference, postprocess) answer only callers that present the mesh's service
token in the `x-meshserve-service-token` metadata header (probes excepted); the gateway's clients
send it on every call, under our name and under the one a real Triton checks.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc
from pydantic import SecretStr

from services.common.errors import DETAILS_KEY, ErrorCode, MeshError

log = logging.getLogger(__name__)

HEADER = "x-meshserve-service-token"
# A real Triton checks the token itself (`--grpc-restricted-protocol`, see
# services/inference/triton_launcher.py) under the name it derives from our key: it prefixes the
# key of --grpc-restricted-protocol=<groups>:<key>=<value> with this (tritonserver 2.51).
TRITON_HEADER = f"triton-grpc-protocol-{HEADER}"
# Methods any caller may use, so that probes and balancers need no secret: liveness and readiness
# only -- gRPC health (Kubernetes probes, Envoy's health checks) and KServe ServerLive, ServerReady,
# ModelReady (Triton's `health` protocol group, which Triton leaves open too, so both backends
# answer the same calls). Reflection is *not* open: it lists every method and message of the stage,
# a map for an attacker and nothing a probe needs; operators with the token can still use it
# (`grpcurl -H "x-meshserve-service-token: $TOKEN" ...`).
OPEN_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ModelReady",
    }
)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# Triton's protocol groups other than `health`: every one of them needs the token.
TRITON_RESTRICTED = ("metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics",
                     "trace", "logging")  # fmt: skip


def resolve_token(token: SecretStr | str | None, token_file: Path | None) -> str | None:
    """The configured token: the value itself, else the first line of the file; None when neither
    is set (authentication off). An empty or unreadable file is a startup error, not "off"."""
    value = token.get_secret_value() if isinstance(token, SecretStr) else token
    if value:
        return value
    if token_file is None:
        return None
    text = Path(token_file).read_text().strip()
    if not text:
        raise ValueError(f"service token file {token_file} is empty")
    return text


def is_open(method: str) -> bool:
    """True for the probe methods that need no token."""
    return method in OPEN_METHODS or method.startswith(OPEN_PREFIXES)


def presents(metadata: Sequence[tuple[str, str | bytes]] | None, token: str) -> bool:
    """True when the call's metadata carries exactly `token` (compared in constant time)."""
    expected = token.encode()
    for key, value in metadata or ():
        if key == HEADER:
            presented = value if isinstance(value, bytes) else value.encode()
            return hmac.compare_digest(presented, expected)
    return False


_REFUSAL = MeshError(ErrorCode.UNAUTHENTICATED, "this service requires the mesh's service token")


async def _refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
    context.set_trailing_metadata(((DETAILS_KEY, _REFUSAL.to_status_details()),))
    await context.abort(_REFUSAL.code.grpc_code, _REFUSAL.message)


# A stream-stream handler fits every kind of call: it neither waits for nor parses a request, so a
# refused call costs no deserialization, whatever its size.
_REFUSE_HANDLER = grpc.stream_stream_rpc_method_handler(_refuse)


class ServiceTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the service token (UNAUTHENTICATED), except the probe methods.

    It runs outermost, before tracing, metrics and error mapping: a call without the token starts
    no span, creates no metric series and never reaches a handler."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty service token would let everyone in")
        self._token = token

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if is_open(method) or presents(handler_call_details.invocation_metadata, self._token):
            return await continuation(handler_call_details)
        log.debug("refused a call without a valid service token", extra={"fields": {"method": method[:200]}})
        return _REFUSE_HANDLER


def server_interceptors(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    """The interceptor to put first in a stage's chain; none when no token is configured."""
    return [ServiceTokenInterceptor(token)] if token else []


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[HEADER] = token
    metadata[TRITON_HEADER] = token
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TokenSender:
    def __init__(self, token: str) -> None:
        self._token = token


class _UnaryUnary(_TokenSender, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._token), request)


class _UnaryStream(_TokenSender, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._token), request)


class _StreamUnary(_TokenSender, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self._token), request_iterator)


class _StreamStream(_TokenSender, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self._token), request_iterator)


def client_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor]:
    """Channel interceptors that put the token on every call of every kind; none without a token."""
    if not token:
        return []
    return [cls(token) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries the token to our stages and to Triton (for stubs and tools
    outside our clients)."""
    return ((HEADER, token), (TRITON_HEADER, token)) if token else ()


def configured_token(settings) -> str | None:
    """The token a settings object (GrpcServiceSettings or UpstreamSettings) configures, if any."""
    return resolve_token(settings.service_token, settings.service_token_file)

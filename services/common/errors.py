"""The error catalog: one vocabulary of failures shared by every service and transport.

Each `ErrorCode` has exactly one gRPC status, one HTTP status, one Hugging Face `error_type` and
one OpenAI error `type`. Services raise `MeshError`; the gRPC error interceptor and the gateway's
HTTP layer are the only places that translate it. On the wire a MeshError travels as the gRPC
status code plus a `google.rpc.Status` detail holding an `ErrorInfo` whose `reason` is the code,
so the exact code survives every hop (a bare gRPC status maps back to the closest code).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

log = logging.getLogger(__name__)

DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "meshserve"


@dataclass(frozen=True)
class _Mapping:
    slug: str  # also keeps every member's value unique: equal values would make enum aliases
    grpc_code: grpc.StatusCode
    http_status: int
    hf_type: str
    openai_type: str
    server_fault: bool  # counts against our SLO (5xx) rather than the caller's


class ErrorCode(enum.Enum):
    INVALID_INPUT = _Mapping(
        "invalid_input", grpc.StatusCode.INVALID_ARGUMENT, 400, "validation", "invalid_request_error", False
    )
    MODEL_NOT_FOUND = _Mapping(
        "model_not_found", grpc.StatusCode.NOT_FOUND, 404, "not_found", "invalid_request_error", False
    )
    NOT_FOUND = _Mapping("not_found", grpc.StatusCode.NOT_FOUND, 404, "not_found", "invalid_request_error", False)
    UNSUPPORTED_TASK = _Mapping(
        "unsupported_task", grpc.StatusCode.INVALID_ARGUMENT, 400, "validation", "invalid_request_error", False
    )
    PAYLOAD_TOO_LARGE = _Mapping(
        "payload_too_large", grpc.StatusCode.INVALID_ARGUMENT, 413, "validation", "invalid_request_error", False
    )
    UNSUPPORTED_MEDIA_TYPE = _Mapping(
        "unsupported_media_type", grpc.StatusCode.INVALID_ARGUMENT, 415, "validation", "invalid_request_error", False
    )
    UNAUTHENTICATED = _Mapping(
        "unauthenticated", grpc.StatusCode.UNAUTHENTICATED, 401, "authentication", "authentication_error", False
    )
    PERMISSION_DENIED = _Mapping(
        "permission_denied", grpc.StatusCode.PERMISSION_DENIED, 403, "permission", "permission_error", False
    )
    RATE_LIMITED = _Mapping(
        "rate_limited", grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "overloaded", "rate_limit_error", False
    )
    QUOTA_EXCEEDED = _Mapping(
        "quota_exceeded", grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "overloaded", "insufficient_quota", False
    )
    MODEL_LOADING = _Mapping(
        "model_loading", grpc.StatusCode.UNAVAILABLE, 503, "overloaded", "service_unavailable", True
    )
    OVERLOADED = _Mapping("overloaded", grpc.StatusCode.UNAVAILABLE, 503, "overloaded", "service_unavailable", True)
    UPSTREAM_UNAVAILABLE = _Mapping(
        "upstream_unavailable", grpc.StatusCode.UNAVAILABLE, 503, "overloaded", "service_unavailable", True
    )
    DEADLINE_EXCEEDED = _Mapping(
        "deadline_exceeded", grpc.StatusCode.DEADLINE_EXCEEDED, 504, "overloaded", "timeout", True
    )
    CANCELLED = _Mapping("cancelled", grpc.StatusCode.CANCELLED, 499, "cancelled", "cancelled", False)
    NOT_IMPLEMENTED = _Mapping(
        "not_implemented", grpc.StatusCode.UNIMPLEMENTED, 501, "not_implemented", "invalid_request_error", False
    )
    INTERNAL = _Mapping("internal", grpc.StatusCode.INTERNAL, 500, "internal", "server_error", True)

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value.grpc_code

    @property
    def http_status(self) -> int:
        return self.value.http_status

    @property
    def hf_type(self) -> str:
        return self.value.hf_type

    @property
    def openai_type(self) -> str:
        return self.value.openai_type

    @property
    def server_fault(self) -> bool:
        return self.value.server_fault

    @property
    def slug(self) -> str:
        """Lower-case code used in JSON bodies and metric labels, e.g. ``model_not_found``."""
        return self.value.slug


# A bare gRPC status (no ErrorInfo, e.g. from Triton or grpc itself) maps to the closest code.
_FROM_GRPC: dict[grpc.StatusCode, ErrorCode] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_INPUT,
    grpc.StatusCode.OUT_OF_RANGE: ErrorCode.INVALID_INPUT,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorCode.INVALID_INPUT,
    grpc.StatusCode.NOT_FOUND: ErrorCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: ErrorCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: ErrorCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorCode.OVERLOADED,
    grpc.StatusCode.UNAVAILABLE: ErrorCode.UPSTREAM_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    # An upstream that cancels a call we did not cancel is going away (a draining server drops
    # calls it had not yet started): the caller may retry, so it is an outage, not a cancellation.
    grpc.StatusCode.CANCELLED: ErrorCode.UPSTREAM_UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED: ErrorCode.NOT_IMPLEMENTED,
}

_BY_SLUG = {code.slug: code for code in ErrorCode}


def code_of(slug: str, default: ErrorCode) -> ErrorCode:
    """The code a slug names (as ErrorInfo reasons and stream error responses carry it)."""
    return _BY_SLUG.get(slug, default)


class MeshError(Exception):
    """A failure with a catalog code and a message that is safe to show the caller.

    `param` names the offending request field where there is one (OpenAI's `param`);
    `retry_after_s` is sent as `Retry-After` on 429/503; `estimated_time_s` is the HF API's
    `estimated_time` of a model that is loading; `headers` are extra HTTP response headers.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
        estimated_time_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.estimated_time_s = estimated_time_s
        # Extra HTTP response headers for the gateway (e.g. RateLimit / RateLimit-Policy on 429).
        self.headers = headers or {}
        if retry_after_s is None and code.http_status in (429, 503):
            retry_after_s = 1.0
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"MeshError({self.code.name}, {self.message!r})"

    # -- gRPC wire form ----------------------------------------------------------------------
    def to_status_details(self) -> bytes:
        """Serialized google.rpc.Status for the `grpc-status-details-bin` trailer."""
        info = error_details_pb2.ErrorInfo(reason=self.code.slug, domain=DOMAIN)
        if self.param:
            info.metadata["param"] = self.param
        if self.retry_after_s is not None:
            info.metadata["retry_after_s"] = f"{self.retry_after_s:g}"
        if self.estimated_time_s is not None:
            info.metadata["estimated_time_s"] = f"{self.estimated_time_s:g}"
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=self.code.grpc_code.value[0], message=self.message, details=[detail])
        return status.SerializeToString()

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, *, upstream: str = "") -> MeshError:
        """Rebuild a MeshError from a failed call, keeping the exact code when it was ours."""
        code_grpc = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = (err.details() if hasattr(err, "details") else None) or str(code_grpc)
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for key, value in trailers or ():
            if key != DETAILS_KEY:
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.domain == DOMAIN and info.reason in _BY_SLUG:
                    retry = info.metadata.get("retry_after_s")
                    estimated = info.metadata.get("estimated_time_s")
                    return cls(
                        _BY_SLUG[info.reason],
                        status.message or message,
                        param=info.metadata.get("param") or None,
                        retry_after_s=float(retry) if retry else None,
                        estimated_time_s=float(estimated) if estimated else None,
                    )
        code = _FROM_GRPC.get(code_grpc, ErrorCode.INTERNAL)
        if code is ErrorCode.UPSTREAM_UNAVAILABLE:
            # Connection failures carry grpc-internal text (target addresses, channel errors): it goes
            # to our log, and the caller learns only which hop failed.
            log.warning("%s service unavailable: %s", upstream or "upstream", message)
            message = f"{upstream or 'upstream'} service is unavailable"
        elif code is ErrorCode.INTERNAL:
            message = f"{upstream or 'upstream'} service failed"
        elif code is ErrorCode.DEADLINE_EXCEEDED:
            message = f"deadline exceeded waiting for {upstream or 'upstream'} service"
        return cls(code, message)


def invalid(message: str, *, param: str | None = None) -> MeshError:
    """Shorthand for the most common error: the caller sent something we cannot use."""
    return MeshError(ErrorCode.INVALID_INPUT, message, param=param)

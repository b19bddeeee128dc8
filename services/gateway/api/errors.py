"""Errors in the caller's dialect: `/v1/*` routes answer OpenAI's `{"error": {message, type, code,
param}}`, the others the HF API's `{"error", "error_type"}`; 429 and 503 carry Retry-After. Also
FastAPI's exception handlers, so that every failure goes out that way."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import ErrorCode, MeshError, invalid
from services.gateway.api.http_io import json_response

log = logging.getLogger(__name__)


def is_openai_path(path: str) -> bool:
    """`/v1/...`, `/v2/rerank`, vLLM's `/tokenize` and `/detokenize`, and a per-provider
    `/{provider}/v1/...` (not an HF model URL's `/models/{id}/v1/chat/completions`, which answers
    in the HF dialect as it always has)."""
    if path.startswith("/v1/") or path in ("/v1", "/v2/rerank", "/tokenize", "/detokenize"):
        return True
    head, _, rest = path[1:].partition("/")
    return head != "models" and (rest.startswith("v1/") or rest == "v1")


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


async def _mesh_error(request: Request, err: MeshError):
    if err.code.server_fault:
        log.warning("request failed", extra={"fields": {"code": err.code.slug, "error": err.message}})
    return error_response(err, request.url.path)


async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.INVALID_INPUT}.get(exc.status_code, ErrorCode.INVALID_INPUT)
    message = "route not found" if exc.status_code == 404 else str(exc.detail)
    response = error_response(MeshError(code, f"{message}: {request.method} {request.url.path}"), request.url.path)
    response.status_code = exc.status_code
    return response


async def _invalid_parameter(request: Request, exc: RequestValidationError):
    # FastAPI's own check of query and path parameters (GET /v1/usage?limit=x): a caller's mistake,
    # answered 400 in the caller's dialect like every other, not FastAPI's 422 {"detail": [...]}.
    first = (exc.errors() or [{}])[0]
    param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    err = invalid(f"`{param}`: {first.get('msg', 'invalid value')}", param=param)
    return error_response(err, request.url.path)


async def _unexpected(request: Request, exc: Exception):
    log.error("unhandled error", exc_info=exc)
    return error_response(MeshError(ErrorCode.INTERNAL, "internal error"), request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MeshError, _mesh_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_parameter)
    app.add_exception_handler(Exception, _unexpected)

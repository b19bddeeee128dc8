"""HTTP bodies in and out: bounded body reads (413 above the limit), JSON parsing as a caller's
400, JSON responses (numpy arrays serialized natively), and the HF options sent as headers."""

from __future__ import annotations

import orjson
from fastapi import Request
from fastapi.responses import Response

from services.common.errors import ErrorCode, MeshError, invalid

JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
GENERATION_BODY_BYTES = 8 * 1024 * 1024  # chat and completion bodies
ADMIN_BODY_BYTES = 64 * 1024


def json_response(content, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content, option=JSON_OPTS), status, headers, media_type="application/json")


def json_bytes(content) -> bytes:
    return orjson.dumps(content, option=JSON_OPTS)


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

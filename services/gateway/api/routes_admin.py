"""Admin REST for API keys (`/admin/keys`) and the usage report (`/v1/usage`), over the service
layer's AdminService. Scopes are enforced before routing (auth.REST_SCOPES): /admin needs
`admin`, /v1/usage `read` (a non-admin key sees only its own usage)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from services.gateway.api.deps import principal, services_of
from services.gateway.api.docs import request_body
from services.gateway.api.http_io import ADMIN_BODY_BYTES, json_response, read_json
from services.gateway.control.auth import Principal
from services.gateway.control.keys import PROVIDER_NAME
from services.gateway.service.admin import KeyRequest
from services.gateway.service.validation import parse

router = APIRouter()


def key_body() -> dict:
    """`POST /admin/keys`'s body as KeyRequest publishes it, plus what the key store checks beyond
    pydantic (control/keys.py validate_spec): at least one scope, provider names' form."""
    body = request_body(KeyRequest)
    properties = body["requestBody"]["content"]["application/json"]["schema"]["properties"]
    properties["scopes"]["minItems"] = 1
    properties["providers"]["items"]["pattern"] = f"^{PROVIDER_NAME.pattern}$"
    return body


@router.post(
    "/admin/keys",
    tags=["admin"],
    summary="Create an API key (the token is shown once)",
    openapi_extra=key_body(),
    responses={201: {"description": "The key, with its `token` (shown this once)."}},
)
async def post_key(request: Request):
    spec = parse(KeyRequest, await read_json(request, ADMIN_BODY_BYTES))
    key, token = await services_of(request).admin.create_key(spec)
    return json_response({**key.public(), "token": token}, 201)


@router.get("/admin/keys", tags=["admin"], summary="List API keys (never their tokens)")
async def list_keys(request: Request):
    keys = await services_of(request).admin.list_keys()
    return json_response({"object": "list", "data": [k.public() for k in keys]})


@router.delete("/admin/keys/{key_id}", tags=["admin"], summary="Revoke an API key")
async def revoke_key(request: Request, key_id: str):
    key = await services_of(request).admin.revoke_key(key_id)
    return json_response(key.public())


@router.get("/v1/usage", tags=["usage"], summary="Usage and cost: your key's, or everyone's for admins")
async def usage(
    request: Request,
    key_id: str | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
    by: Literal["day", "model", "key", "provider"] = "day",
    limit: int = Query(100, ge=0, le=10_000),
    caller: Principal = Depends(principal),
):
    rows, totals = await services_of(request).admin.usage(
        caller, key_id=key_id, model=model, since=since, until=until, by=by, limit=limit
    )
    return json_response({"object": "list", "data": rows, "totals": {"by": by, "groups": totals}})

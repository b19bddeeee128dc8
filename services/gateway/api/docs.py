"""The API's own documentation, usable from a browser with no network and no key: Swagger UI at
`/docs` and ReDoc at `/redoc` from the assets that ship in the `fastapi-offline` wheel (served
under `/static-offline-docs`, no CDN), both and `/openapi.json` public (control/auth.py), and an
HTTP bearer security scheme in the document so that Swagger UI's "Authorize" takes an API key and
"Try it out" sends it. Routes that need no key (health, readiness, the docs, public metrics) say
so with an empty `security`.

Request bodies come from pydantic (`Model.model_json_schema()` in each route's `openapi_extra`),
each with its nested models in a `$defs` of its own, referenced as `#/$defs/Name`: a reference
that resolves against the document's root in OpenAPI, where there is no `$defs` (schemathesis,
Swagger UI and code generators all fail on it). `hoist_defs` moves every such block into
`components/schemas` and points the references there; a name two bodies define differently gets
a numbered suffix.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

from fastapi import FastAPI
from pydantic import BaseModel

from services.gateway.control.auth import rest_scope

SCHEME = "bearerAuth"
SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key (`msk_...`): the admin token in `.meshserve/admin-token`, or a key made with "
    "`POST /admin/keys`. Sent as `Authorization: Bearer <key>`.",
}
STATIC_URL = "/static-offline-docs"  # fastapi-offline's default mount


def request_body(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra`: its JSON body, as the pydantic model that validates it."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def with_security(openapi: Callable[[], dict], *, metrics_public: bool) -> Callable[[], dict]:
    """`app.openapi`, wrapped: the bearer scheme added once to the document FastAPI builds."""
    done: dict = {}

    def document() -> dict:
        if not done:
            schema = hoist_defs(copy.deepcopy(openapi()))  # route bodies are shared dicts: not in place
            schema.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME] = SECURITY_SCHEME
            schema["security"] = [{SCHEME: []}]
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    if (
                        isinstance(operation, dict)
                        and rest_scope(method.upper(), path, metrics_public=metrics_public) is None
                    ):
                        operation["security"] = []
            done["schema"] = schema
        return done["schema"]

    return document


def hoist_defs(document: dict) -> dict:
    """The document with every nested `$defs` block moved to `components/schemas` (in place)."""
    shared = document.setdefault("components", {}).setdefault("schemas", {})

    def visit(node):
        if isinstance(node, list):
            for item in node:
                visit(item)
        elif isinstance(node, dict):
            defs = node.pop("$defs", None)
            if isinstance(defs, dict):
                renames = {name: _shared_name(shared, name, schema) for name, schema in defs.items()}
                _retarget(node, renames)
                for name, schema in defs.items():
                    _retarget(schema, renames)
                    shared[renames[name]] = schema
                    visit(schema)
            for value in node.values():
                visit(value)

    visit(document.get("paths", {}))
    return document


def _shared_name(shared: dict, name: str, schema: dict) -> str:
    """`name` in components/schemas, or `name2`, `name3`... when another schema holds it."""
    candidate, n = name, 1
    while candidate in shared and _canonical(shared[candidate]) != _canonical(schema):
        n += 1
        candidate = f"{name}{n}"
    return candidate


def _canonical(schema) -> str:
    return json.dumps(schema, sort_keys=True).replace("#/components/schemas/", "#/$defs/")


def _retarget(node, renames: dict[str, str]) -> None:
    """`#/$defs/Name` references under `node` pointed at `#/components/schemas/<renamed>`."""
    if isinstance(node, list):
        for item in node:
            _retarget(item, renames)
    elif isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[len("#/$defs/") :] in renames:
            node["$ref"] = "#/components/schemas/" + renames[ref[len("#/$defs/") :]]
        for key, value in node.items():
            if key != "$defs":
                _retarget(value, renames)


def install(app: FastAPI, *, metrics_public: bool) -> None:
    app.openapi = with_security(app.openapi, metrics_public=metrics_public)  # type: ignore[method-assign]

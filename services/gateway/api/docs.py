"""The API's own documentation, usable from a browser with no network and no key: Swagger UI at
`/docs` and ReDoc at `/redoc` from the assets that ship in the `fastapi-offline` wheel (served
under `/static-offline-docs`, no CDN), both and `/openapi.json` public (control/auth.py), and an
HTTP bearer security scheme in the document so that Swagger UI's "Authorize" takes an API key and
"Try it out" sends it. Routes that need no key (health, readiness, the docs, public metrics) say
so with an empty `security`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from services.gateway.control.auth import rest_scope

SCHEME = "bearerAuth"
SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key (`msk_...`): the admin token in `.meshserve/admin-token`, or a key made with "
    "`POST /admin/keys`. Sent as `Authorization: Bearer <key>`.",
}
STATIC_URL = "/static-offline-docs"  # fastapi-offline's default mount


def with_security(openapi: Callable[[], dict], *, metrics_public: bool) -> Callable[[], dict]:
    """`app.openapi`, wrapped: the bearer scheme added once to the document FastAPI builds."""
    done: dict = {}

    def document() -> dict:
        if not done:
            schema = openapi()
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


def install(app: FastAPI, *, metrics_public: bool) -> None:
    app.openapi = with_security(app.openapi, metrics_public=metrics_public)  # type: ignore[method-assign]

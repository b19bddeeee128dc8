"""Every REST route needs the scope its kind of work needs: an `inference` key reaches every route
that runs a model (the per-provider paths and reranking included), only `admin` reaches key
management, and health stays public. Walks the app's own routers, so a route added without a
scope entry (which would fall through to `admin`) fails here."""

from __future__ import annotations

import re

import pytest

from services.gateway.api.http_app import ROUTERS
from services.gateway.control.auth import rest_scope

SAMPLES = {"model_path": "org/model-1", "provider": "mesh-b", "key_id": "k1", "path": "org/model-1/embed"}
PUBLIC = {"/health", "/healthz", "/readyz"}


def _concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(:path)?\}", lambda m: SAMPLES[m.group(1)], path)


ROUTES = sorted({(method, route.path) for router in ROUTERS for route in router.routes for method in route.methods})


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_each_route_needs_the_scope_of_its_work(method, path):
    concrete = _concrete(path)
    if method == "GET" and path.startswith("/models/"):
        concrete += "/info"  # what GET on a model URL serves (…/health is the other)
    scope = rest_scope(method, concrete, metrics_public=True)
    if path.startswith("/admin"):
        assert scope == "admin"
    elif path in PUBLIC or path == "/metrics":
        assert scope is None
    elif method == "POST":
        assert scope == "inference", f"{method} {concrete} needs {scope!r}"
    else:
        assert scope == "read", f"{method} {concrete} needs {scope!r}"


def test_a_model_url_under_a_provider_is_inference_not_admin():
    assert rest_scope("POST", "/mesh-b/models/org/m:cheapest/pipeline/feature-extraction", metrics_public=True) == (
        "inference"
    )
    assert rest_scope("POST", "/admin/keys", metrics_public=True) == "admin"

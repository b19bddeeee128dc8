"""The gateway's OpenAPI document, built in-process (no mesh): self-contained (every `$ref` resolves,
the nested `$defs` of the pydantic request bodies hoisted to `components/schemas`), a request body on
every JSON route of chat, completions, embeddings and key creation, and the published schemas agree
with what the server refuses beyond pydantic (a few hand-picked bodies, through the validator the
routes use; tests/e2e/test_api_docs.py fuzzes the rest against a real gateway)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from services.gateway.api.docs import hoist_defs
from tests.e2e.test_api_docs import refs, resolves


@pytest.fixture(scope="module")
def document() -> dict:
    from services.gateway.api.http_app import create_app
    from services.gateway.main import build_pipeline
    from services.gateway.service import GatewayServices
    from services.gateway.settings import GatewaySettings

    async def build():
        settings = GatewaySettings()
        pipeline = build_pipeline(settings)  # channels connect lazily: nothing is dialled
        app = create_app(settings, GatewayServices.build(settings, pipeline))
        await pipeline.close()
        return app.openapi()

    return asyncio.run(build())


def body_schema(document: dict, path: str) -> jsonschema.Validator:
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def test_every_reference_resolves_and_no_body_keeps_its_own_defs(document):
    assert not sorted(r for r in refs(document) if not resolves(document, r))
    assert "$defs" not in json.dumps(document["paths"])
    assert {"SentenceSimilarityInputs", "ChatMessageIn"} <= set(document["components"]["schemas"])


def test_two_bodies_defining_one_name_differently_keep_both():
    first = {"type": "object", "properties": {"a": {"type": "string"}}}
    second = {"type": "object", "properties": {"b": {"type": "integer"}}}
    doc = {
        "paths": {
            "/x": {"post": {"schema": {"$defs": {"Part": first}, "items": {"$ref": "#/$defs/Part"}}}},
            "/y": {"post": {"schema": {"$defs": {"Part": second}, "items": {"$ref": "#/$defs/Part"}}}},
        }
    }
    hoisted = hoist_defs(doc)
    assert hoisted["components"]["schemas"] == {"Part": first, "Part2": second}
    assert hoisted["paths"]["/y"]["post"]["schema"]["items"] == {"$ref": "#/components/schemas/Part2"}


@pytest.mark.parametrize(
    ("path", "body", "allowed"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, True),
        ("/v1/chat/completions", {"model": "m", "messages": []}, False),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}], "top_logprobs": 2}, False),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}], "tool_choice": "required"}, False),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}], "stop": [""]}, False),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}], "skip_special_tokens": False}, False),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}], "logit_bias": {"x": 1}}, False),
        ("/v1/completions", {"model": "m", "prompt": "a", "n": 2, "best_of": 2}, True),
        ("/v1/completions", {"model": "m", "prompt": "a", "n": 2, "best_of": 3}, False),
        ("/v1/completions", {"model": "m", "prompt": ["a", "b"]}, False),
        ("/v1/completions", {"model": "m", "prompt": "a", "echo": True}, False),
        ("/v1/completions", {"model": "m", "prompt": "a", "logprobs": True}, False),
        ("/v1/embeddings", {"model": "m", "input": [[1, 2], [3]]}, True),
        ("/v1/embeddings", {"model": "m", "input": "  "}, False),
        ("/v1/embeddings", {"model": "m", "input": [1, 2], "prompt_name": "query"}, False),
        ("/admin/keys", {"name": "k", "scopes": ["read"], "providers": ["local"]}, True),
        ("/admin/keys", {"name": "k", "scopes": []}, False),
        ("/admin/keys", {"name": "k", "providers": ["Not A Name"]}, False),
    ],
)
def test_the_published_body_schema_says_what_the_server_refuses(document, path, body, allowed):
    assert body_schema(document, path).is_valid(body) is allowed

"""The HF task route's fast path (http_app.HfTaskFastPath) answers as FastAPI's own stack does: the
same status, body and headers for every kind of failure, in the HF dialect. The gateway is the real
ASGI app; its stages are an address where nothing listens."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import ErrorCode, MeshError
from services.gateway.api import routes_hf
from services.gateway.api.http_app import create_app, wrap
from services.gateway.main import build_pipeline
from services.gateway.service import GatewayServices
from services.gateway.settings import GatewaySettings
from tests.helpers import MODEL_ID

NOWHERE = "127.0.0.1:9"  # discard port: nothing listens


@pytest.fixture
async def both(tmp_path):
    """(fast path client, FastAPI-only client) over one app."""
    settings = GatewaySettings(
        home=str(tmp_path), auth=False, ledger=False, coalesce=False, upstream_attempts=1,
        preprocess_address=NOWHERE, inference_address=NOWHERE, postprocess_address=NOWHERE,
    )  # fmt: skip
    pipeline = build_pipeline(settings)
    app = create_app(settings, GatewayServices.build(settings, pipeline))
    transports = [httpx.ASGITransport(app=wrap(app, settings, fast_path=fast)) for fast in (True, False)]
    async with (
        httpx.AsyncClient(transport=transports[0], base_url="http://gateway", timeout=30) as fast,
        httpx.AsyncClient(transport=transports[1], base_url="http://gateway", timeout=30) as slow,
    ):
        yield fast, slow
    await pipeline.close()


def same(a: httpx.Response, b: httpx.Response) -> None:
    assert (a.status_code, a.content) == (b.status_code, b.content)
    drop = {"x-request-id"}
    assert {k: v for k, v in a.headers.items() if k not in drop} == {
        k: v for k, v in b.headers.items() if k not in drop
    }


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/models/no/such-model", b'{"inputs": "x"}', 404),
        (f"/models/{MODEL_ID}", b"{not json", 400),
        (f"/models/{MODEL_ID}", b'{"parameters": {}}', 400),
        (f"/models/{MODEL_ID}/pipeline/no-such-task", b'{"inputs": "x"}', 400),
        (f"/models/{MODEL_ID}", b'{"inputs": "x"}', 503),  # preprocess is unreachable
        ("/models/", b'{"inputs": "x"}', 404),
    ],
)
async def test_errors_are_those_of_fastapi(both, path, body, status):
    headers = {"content-type": "application/json", "x-use-cache": "false"}
    replies = [await client.post(path, content=body, headers=headers) for client in both]
    assert replies[0].status_code == status, replies[0].text
    assert "error" in replies[0].json() and "error_type" in replies[0].json()
    same(*replies)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("a bug"),
        MeshError(ErrorCode.OVERLOADED, "busy", retry_after_s=3),
        StarletteHTTPException(405, "not here"),
    ],
)
async def test_exceptions_go_through_the_apps_handlers(both, monkeypatch, error):
    async def failing(request, model_path, provider=None):
        raise error

    monkeypatch.setattr(routes_hf, "hf_post", failing)
    replies = [await client.post(f"/models/{MODEL_ID}", content=b"{}") for client in both]
    assert replies[0].status_code == {RuntimeError: 500, MeshError: 503, StarletteHTTPException: 405}[type(error)]
    same(*replies)


CHAT = "meshserve/tiny-llama-chat"
USER = [{"role": "user", "content": "x"}]


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("path", "content", "status"),
    [
        ("/v1/chat/completions", body(model="no/such-model", messages=USER), 404),
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/chat/completions", body(model=CHAT), 400),  # no messages
        ("/v1/chat/completions", body(model=MODEL_ID, messages=USER), 400),  # not a generation model
        ("/v1/chat/completions", body(model=CHAT, messages=USER), 503),  # preprocess is unreachable
        ("/v1/chat/completions", body(model=CHAT, messages=USER, stream=True), 503),
        ("/v1/completions", body(model=CHAT, prompt="x", max_tokens=-1), 400),
        ("/v1/completions", body(model=CHAT, prompt="x", stream=True), 503),
    ],
)
async def test_openai_generation_errors_are_those_of_fastapi(both, path, content, status):
    """The OpenAI generation routes take the fast path too; a refusal is FastAPI's, in the OpenAI
    dialect (a stream that cannot start answers its error as JSON, before any event)."""
    headers = {"content-type": "application/json"}
    replies = [await client.post(path, content=content, headers=headers) for client in both]
    assert replies[0].status_code == status, replies[0].text
    assert set(replies[0].json()["error"]) >= {"message", "type"}
    same(*replies)

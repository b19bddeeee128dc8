"""A started generation whose client leaves settles however it ends: before the response body
starts (the upstream stream it opened is closed, the budget hold settled, one ledger row, status
499), and after tokens went out (a failure mid-way still pays for what was delivered)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from starlette.requests import ClientDisconnect

from services.common.catalog import Catalog
from services.common.errors import ErrorCode, MeshError
from services.gateway.api.generation_responses import respond
from services.gateway.api.sse import chat_events
from services.gateway.control.auth import Principal
from services.gateway.control.keys import ApiKey
from services.gateway.control.local_store import LocalControlStore
from services.gateway.control.metering import Metering
from services.gateway.pipeline.generation import GenerationRequest, Prepared, Step
from services.gateway.service.generate import Generation

CHAT = Catalog.load(Path(__file__).parents[2] / "catalog.yaml").get("meshserve/tiny-llama-chat")
HEAD = {"id": "chatcmpl-1", "created": 1, "model": CHAT.id}


@pytest.fixture
async def metering():
    rows, store = [], LocalControlStore()

    class Ledger:
        append = rows.append

    yield Metering(store, Ledger(), timeout_s=1.0), rows, store
    await store.close()


async def _generation(metering, steps, closed: list) -> Generation:
    metering, _, _ = metering
    key = ApiKey(id=secrets.token_hex(8), name="t", scopes=("inference",), budget_usd=10.0)
    metered = await metering.admit(Principal(key), CHAT, "text-generation", "/v1/chat/completions", "r1",
                                   max_input_tokens=8, max_output_tokens=8)  # fmt: skip

    async def stream_of(_entry, _prepared, _request):
        for step in steps:
            if isinstance(step, Exception):
                raise step
            yield step

    async def abandon():
        closed.append(True)

    request = GenerationRequest(messages=[("user", "hi")])
    return Generation(CHAT, request, Prepared([1, 2], 8, []), metered, metering, stream_of, abandon=abandon)


async def _serve(response, *, fail_on: str | None):
    """Run the ASGI response; `fail_on`: the message type whose send raises (the client is gone)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == fail_on:
            raise OSError("client went away")
        sent.append(message)

    with pytest.raises((OSError, ClientDisconnect)):
        await response({"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST"}, receive, send)
    return sent


async def test_a_client_gone_before_the_body_settles_the_request_and_closes_the_upstream(metering):
    closed = []
    generation = await _generation(metering, [Step("a"), Step("", final=True, finish_reason="stop")], closed)
    response = await respond(generation, True, lambda steps: chat_events(steps, HEAD, False), dict)
    await _serve(response, fail_on="http.response.start")
    _, rows, store = metering
    assert closed == [True], "the opened upstream stream was not closed"
    assert [row[10] for row in rows] == [499], "one ledger row, the caller's abandonment"
    assert (await store.spent(generation.metered.principal.key.id, "month"))[1] == 0, "the hold was not settled"


async def test_a_stream_failing_after_tokens_went_out_pays_for_them(metering):
    steps = [Step("a"), Step("b"), MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, "gone")]
    generation = await _generation(metering, steps, [])
    response = await respond(generation, True, lambda s: chat_events(s, HEAD, False), dict)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await response({"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST"}, receive, send)
    _, rows, _ = metering
    body = b"".join(m.get("body", b"") for m in sent)
    assert b'"error"' in body, "the stream did not end with an error event"
    (row,) = rows
    assert row[10] == 503 and row[6] == 2 and row[9] > 0, "a failed stream did not pay for its delivered tokens"

"""The upstream adapters against the fake upstream server (a real process on loopback): every
kind's ops, the headers they send, and every injected fault as the right UpstreamError."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import orjson
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from services.gateway.providers.config import ProviderSpec
from services.gateway.providers.http import error_message, parse_retry_after
from services.gateway.providers.types import Delta, UpstreamError
from services.gateway.providers.upstreams import (
    HFUpstream,
    OpenAIUpstream,
    TEIUpstream,
    TGIUpstream,
    Upstream,
    make_upstream,
)
from tests.fakes.upstream import FakeUpstream, start_fake, vector

# One worker runs the whole module: its module-scoped fakes and gateway start once, not once per worker.
pytestmark = pytest.mark.xdist_group("providers-upstreams")
KEY_ENV = "MESHSERVE_TEST_UPSTREAM_KEY"
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say three words"}]}


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Iterator[FakeUpstream]:
    tasks = {"acme/clf": "text-classification", "acme/vec": "feature-extraction", "acme/gen": "text-generation"}
    up = start_fake(tmp_path_factory.mktemp("fake"), "t", hf_tasks=tasks)
    yield up
    up.stop()


@pytest.fixture(autouse=True)
def _fresh(fake: FakeUpstream) -> None:
    fake.control(mode="ok", latency_ms=0, tokens_per_s=None, retry_after=None, status=503, location=None)
    fake.clear()


@pytest.fixture
async def make(fake: FakeUpstream) -> AsyncIterator:
    """make(kind, **spec fields) -> an Upstream on the fake; all closed after the test."""
    made: list[Upstream] = []

    def build(kind: str, **kw) -> Upstream:
        fields = {
            "name": f"p-{kind}",
            "kind": kind,
            "base_url": fake.url + ("/v1" if kind == "openai" else ""),
            "models": {"m": "up-m"},
            "timeouts": {"connect_s": 2, "first_byte_s": 5, "total_s": 20},
            **kw,
        }
        up = make_upstream(ProviderSpec(**fields))
        made.append(up)
        return up

    yield build
    for up in made:
        await up.close()


async def collect(stream) -> tuple[list[Delta], Delta]:
    """Every delta of an opened stream: (the text deltas, the final one)."""
    try:
        deltas = [await stream.first()]
        async for d in stream:
            deltas.append(d)
    finally:
        await stream.aclose()
    assert deltas[-1].final and not any(d.final for d in deltas[:-1])
    return deltas[:-1], deltas[-1]


def words(n: int) -> str:
    return " ".join(f"tok{i}" for i in range(n))


# ---------------------------------------------------------------- each kind's ops


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_chat(make, fake: FakeUpstream, stream: bool) -> None:
    up = make("openai")
    gen = await up.generate("up-m", {**CHAT, "max_tokens": 3, "temperature": 0.5}, stream=stream, request_id="r1")
    texts, final = await collect(gen)
    assert "".join(d.text for d in texts) == words(3)
    assert final.finish_reason == "length"
    assert (final.prompt_tokens, final.completion_tokens) == (5, 3)
    assert gen.upstream_request_id and gen.upstream_request_id.startswith("fake-t-")
    (req,) = fake.requests()
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "up-m" and req["body"]["temperature"] == 0.5 and req["body"]["stream"] is stream
    if stream:
        assert len(texts) == 3
        assert req["body"]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_completion(make, fake: FakeUpstream, stream: bool) -> None:
    up = make("openai")
    gen = await up.generate(
        "up-m", {"prompt": "one two", "max_tokens": 4, "stop": ["x"]}, stream=stream, request_id="r"
    )
    texts, final = await collect(gen)
    assert "".join(d.text for d in texts) == words(4)
    assert (final.finish_reason, final.prompt_tokens, final.completion_tokens) == ("length", 2, 4)
    (req,) = fake.requests()
    assert req["path"] == "/v1/completions" and req["body"]["prompt"] == "one two" and req["body"]["stop"] == ["x"]


async def test_openai_embeddings(make, fake: FakeUpstream) -> None:
    up = make("openai")
    out = await up.embed("up-m", ["a b", "c", "a b"], dimensions=None, request_id="r")
    assert out.vectors.shape == (3, 8) and out.vectors.dtype == np.float32
    np.testing.assert_allclose(out.vectors[0], vector("a b", 8), rtol=1e-6)
    np.testing.assert_array_equal(out.vectors[0], out.vectors[2])
    assert out.input_tokens == 5 and out.upstream_request_id
    cut = await up.embed("up-m", ["a b"], dimensions=4, request_id="r")
    assert cut.vectors.shape == (1, 4)
    assert fake.requests()[-1]["body"] == {
        "model": "up-m",
        "input": ["a b"],
        "encoding_format": "float",
        "dimensions": 4,
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_tgi_generate(make, fake: FakeUpstream, stream: bool) -> None:
    up = make("tgi")
    request = {"prompt": "hello there world", "max_tokens": 5, "temperature": 0, "top_p": 1.0, "seed": 7}
    texts, final = await collect(await up.generate("m", request, stream=stream, request_id="r"))
    assert "".join(d.text for d in texts) == words(5)
    assert (final.finish_reason, final.completion_tokens) == ("length", 5)
    assert final.prompt_tokens == 3  # stream: details.input_length; unary: the x-prompt-tokens header
    (req,) = fake.requests()
    assert req["path"] == ("/generate_stream" if stream else "/generate")
    assert req["headers"]["accept"] == ("text/event-stream" if stream else "application/json")
    params = req["body"]["parameters"]
    assert params["max_new_tokens"] == 5 and params["do_sample"] is False and params["seed"] == 7
    assert "temperature" not in params and "top_p" not in params  # TGI refuses 0 and 1.0


async def test_tgi_chat_speaks_openai(make, fake: FakeUpstream) -> None:
    up = make("tgi")
    texts, final = await collect(await up.generate("m", {**CHAT, "max_tokens": 2}, stream=True, request_id="r"))
    assert [d.text for d in texts] == ["tok0", " tok1"] and final.completion_tokens == 2
    assert fake.requests()[0]["path"] == "/v1/chat/completions"


async def test_tei_embed_and_rerank(make, fake: FakeUpstream) -> None:
    up = make("tei")
    out = await up.embed("m", ["x y", "z"], dimensions=None, request_id="r")
    assert out.vectors.shape == (2, 8) and out.input_tokens == 3
    cut = await up.embed("m", ["x y"], dimensions=4, request_id="r")  # cut here, renormalized
    assert cut.vectors.shape == (1, 4) and abs(float(np.linalg.norm(cut.vectors[0])) - 1) < 1e-5
    assert fake.requests()[-1]["body"] == {"inputs": ["x y"], "normalize": True}
    np.testing.assert_allclose(out.vectors[1], vector("z", 8), rtol=1e-6)
    docs = ["nothing here", "the cat sat", "cat"]
    ranked = await up.rerank("m", "the cat", docs, raw_scores=False, request_id="r")
    assert len(ranked.scores) == 3 and max(ranked.scores) == ranked.scores[1]  # document order kept
    assert all(0 < s < 1 for s in ranked.scores)
    raw = await up.rerank("m", "the cat", docs, raw_scores=True, request_id="r")
    assert raw.scores[1] > 1  # logits, not probabilities
    assert fake.requests()[-1]["body"] == {"query": "the cat", "texts": docs, "raw_scores": True}


async def test_hf_tasks(make, fake: FakeUpstream) -> None:
    up = make("hf", models={"acme/clf": None, "acme/vec": None, "acme/gen": None})
    reply = await up.hf_task("acme/clf", "text-classification", b'{"inputs": ["good", "bad"]}', request_id="r")
    labels = orjson.loads(reply.content)
    assert len(labels) == 2 and {r["label"] for r in labels[0]} == {"POSITIVE", "NEGATIVE"}
    assert reply.upstream_request_id and fake.requests()[0]["path"] == "/models/acme/clf"
    out = await up.embed("acme/vec", ["a", "b"], dimensions=None, request_id="r")
    assert out.vectors.shape == (2, 8)
    assert fake.requests()[-1]["path"] == "/models/acme/vec/pipeline/feature-extraction"
    cut = await up.embed("acme/vec", ["a"], dimensions=3, request_id="r")
    assert cut.vectors.shape == (1, 3) and abs(float(np.linalg.norm(cut.vectors[0])) - 1) < 1e-5
    for stream in (False, True):
        texts, final = await collect(await up.generate("acme/gen", {"prompt": "p", "max_tokens": 3}, stream=stream,
                                                       request_id="r"))  # fmt: skip
        assert "".join(d.text for d in texts) == words(3) and final.completion_tokens == 3
    body = fake.requests()[-1]["body"]
    assert body["stream"] is True and body["parameters"]["return_full_text"] is False
    texts, _ = await collect(await up.generate("acme/gen", {**CHAT, "max_tokens": 1}, stream=False, request_id="r"))
    assert texts[0].text == "tok0" and fake.requests()[-1]["path"] == "/models/acme/gen/v1/chat/completions"


async def test_unserved_ops_raise_not_implemented(make) -> None:
    with pytest.raises(NotImplementedError):
        await make("tei").generate("m", {"prompt": "x"}, stream=False, request_id="r")
    with pytest.raises(NotImplementedError):
        await make("openai").rerank("m", "q", ["a"], raw_scores=False, request_id="r")
    with pytest.raises(NotImplementedError):
        await make("tgi").embed("m", ["a"], dimensions=None, request_id="r")
    with pytest.raises(NotImplementedError):
        await make("openai").hf_task("m", "fill-mask", b"{}", request_id="r")


def test_make_upstream_kinds(fake: FakeUpstream) -> None:
    kinds = {"openai": OpenAIUpstream, "tgi": TGIUpstream, "tei": TEIUpstream, "hf": HFUpstream}
    for kind, cls in kinds.items():
        up = make_upstream(ProviderSpec(name="x", kind=kind, base_url=fake.url, models={"m": None}))
        assert type(up) is cls and up.kind == kind and up.name == "x"
    with pytest.raises(ValueError, match="no upstream adapter"):
        make_upstream(ProviderSpec(name="local", kind="local"))


# ---------------------------------------------------------------- headers


async def test_headers_key_static_request_id(make, fake: FakeUpstream, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    up = make("openai", api_key_env=KEY_ENV, headers={"X-Team": "blue"})
    await collect(await up.generate("up-m", {"prompt": "x", "max_tokens": 1}, stream=False, request_id="req-42"))
    monkeypatch.setenv(KEY_ENV, "sk-rotated")  # read at call time: a rotated key is used at once
    await up.embed("up-m", ["x"], dimensions=None, request_id="req-43")
    first, second = (r["headers"] for r in fake.requests())
    assert first["authorization"] == "Bearer sk-test-123" and second["authorization"] == "Bearer sk-rotated"
    assert first["x-team"] == "blue" and first["x-request-id"] == "req-42" and second["x-request-id"] == "req-43"
    assert first["content-type"] == "application/json"
    assert "traceparent" not in first  # no span, nothing to propagate


async def test_no_key_env_no_authorization(make, fake: FakeUpstream, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    await make("tei", api_key_env=KEY_ENV).embed("m", ["x"], dimensions=None, request_id="r")
    assert "authorization" not in fake.requests()[0]["headers"]


async def test_traceparent_is_the_active_span(make, fake: FakeUpstream) -> None:
    tracer = TracerProvider().get_tracer("test")
    up = make("tgi")
    with tracer.start_as_current_span("provider.attempt") as span:
        await collect(await up.generate("m", {"prompt": "x", "max_tokens": 1}, stream=True, request_id="r"))
    ctx = span.get_span_context()
    version, trace_id, span_id, _flags = fake.requests()[0]["headers"]["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("status", "retry_after", "retryable"),
    [(503, None, True), (500, None, True), (429, "2", True), (408, None, True), (401, None, True),
     (403, None, True), (404, None, True), (424, None, True), (400, None, False), (413, None, False),
     (422, None, False)],
)  # fmt: skip
async def test_status_faults(make, fake: FakeUpstream, status: int, retry_after: str | None, retryable: bool) -> None:
    fake.control(mode="status", status=status, retry_after=retry_after)
    for call in (
        lambda up: up.generate("up-m", {**CHAT}, stream=True, request_id="r"),
        lambda up: up.embed("up-m", ["x"], dimensions=None, request_id="r"),
    ):
        with pytest.raises(UpstreamError) as info:
            await call(make("openai"))
        err = info.value
        assert (err.status, err.retryable, err.code) == (status, retryable, f"upstream_{status}")
        assert err.retry_after == (float(retry_after) if retry_after else None)
        assert f"injected status {status}" in err.message and err.message.startswith("p-openai: ")
        assert err.upstream_request_id and err.upstream_request_id.startswith("fake-t-")
        assert err.timeout is (status == 408)


async def test_tgi_error_body_message(make, fake: FakeUpstream) -> None:
    fake.control(mode="status", status=422)
    with pytest.raises(UpstreamError) as info:
        await make("tgi").generate("m", {"prompt": "x"}, stream=False, request_id="r")
    assert info.value.message == "p-tgi: 422 fake t: injected status 422" and not info.value.retryable


async def test_refused_then_listening_again(make, fake: FakeUpstream) -> None:
    up = make("tei")
    await up.embed("m", ["x"], dimensions=None, request_id="r")  # a pooled connection exists
    fake.control(mode="refuse")
    for _ in range(2):
        with pytest.raises(UpstreamError) as info:
            await up.embed("m", ["x"], dimensions=None, request_id="r")
        assert info.value.status == 0 and info.value.retryable and not info.value.timeout
    fake.control(mode="ok")
    out = await up.embed("m", ["x"], dimensions=None, request_id="r")
    assert out.vectors.shape == (1, 8)


async def test_connect_refused_code(make) -> None:
    up = make("openai", base_url="http://127.0.0.1:9/v1")  # discard port: nothing listens
    with pytest.raises(UpstreamError) as info:
        await up.embed("m", ["x"], dimensions=None, request_id="r")
    assert (info.value.status, info.value.retryable, info.value.code) == (0, True, "upstream_connect_error")


@pytest.mark.parametrize("stream", [False, True])
async def test_slow_first_byte_times_out(make, fake: FakeUpstream, stream: bool) -> None:
    """A stream's headers must come within first_byte_s; a non-streamed answer within total_s."""
    fake.control(mode="slow_first_byte", delay_ms=3000)
    limit = {"first_byte_s": 0.3, "total_s": 20} if stream else {"first_byte_s": 10, "total_s": 0.3}
    up = make("openai", timeouts={"connect_s": 2, **limit})
    with pytest.raises(UpstreamError) as info:
        gen = await up.generate("up-m", {**CHAT}, stream=stream, request_id="r")
        await collect(gen)
    err = info.value
    assert (err.status, err.retryable, err.timeout, err.code) == (0, True, True, "upstream_timeout")


async def test_stalled_stream_times_out(make, fake: FakeUpstream) -> None:
    """A stream that stops sending for longer than first_byte_s fails; after output, not retryably."""
    fake.control(tokens_per_s=0.2)  # one chunk, then 5 s to the next
    up = make("openai", timeouts={"connect_s": 2, "first_byte_s": 0.5, "total_s": 20})
    gen = await up.generate("up-m", {**CHAT, "max_tokens": 3}, stream=True, request_id="r")
    try:
        assert (await gen.first()).text == "tok0"  # the first chunk comes with the headers
        with pytest.raises(UpstreamError) as info:
            await gen.__anext__()
        assert (info.value.code, info.value.timeout, info.value.retryable) == ("upstream_timeout", True, False)
    finally:
        await gen.aclose()


async def test_first_delta_within_first_byte_s(make) -> None:
    """Headers at once, then only keep-alive comments: first() gives up after first_byte_s (counted
    from sending the request), retryably; each comment alone would keep the socket read alive."""

    async def keepalive(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b": keep-alive\n\n")
            await asyncio.sleep(0.05)
        return resp

    runner, port = await serve_inline(keepalive, "/v1/chat/completions")
    try:
        up = make("openai", base_url=f"http://127.0.0.1:{port}/v1",
                  timeouts={"connect_s": 2, "first_byte_s": 0.4, "total_s": 20})  # fmt: skip
        gen = await up.generate("m", {**CHAT}, stream=True, request_id="r")
        with pytest.raises(UpstreamError) as info:
            await gen.first()
        await gen.aclose()
        assert (info.value.code, info.value.timeout, info.value.retryable) == ("upstream_timeout", True, True)
    finally:
        await runner.cleanup()


async def serve_inline(handler, path: str) -> tuple[web.AppRunner, int]:
    """A one-route aiohttp server in this process (for wire behaviours the fake does not have)."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def test_closed_keepalive_connection_is_retried_once(make) -> None:
    """A pooled connection the server drops without answering (it closed it as we sent) is not an
    upstream failure: the call goes again on a fresh connection."""
    served: dict[int, int] = {}

    async def embed(request: web.Request) -> web.Response:
        conn = request.transport.get_extra_info("peername")[1]  # the client port: one per connection
        served[conn] = served.get(conn, 0) + 1
        if served[conn] > 1:  # every connection answers once, then drops the next request
            request.transport.abort()
        return web.json_response([[1.0, 0.0]])

    runner, port = await serve_inline(embed, "/embed")
    try:
        up = make("tei", base_url=f"http://127.0.0.1:{port}")
        for _ in range(3):
            out = await up.embed("m", ["x"], dimensions=None, request_id="r")
            assert out.vectors.shape == (1, 2)
        assert len(served) == 3 and sorted(served.values()) == [1, 2, 2]
    finally:
        await runner.cleanup()


async def test_hang_times_out(make, fake: FakeUpstream) -> None:
    fake.control(mode="hang")
    up = make("tei", timeouts={"connect_s": 2, "first_byte_s": 10, "total_s": 0.5})
    with pytest.raises(UpstreamError) as info:
        await up.rerank("m", "q", ["a"], raw_scores=False, request_id="r")
    assert info.value.timeout and info.value.retryable and info.value.status == 0


@pytest.mark.parametrize("kind", ["openai", "tgi"])
async def test_die_mid_stream(make, fake: FakeUpstream, kind: str) -> None:
    fake.control(mode="die_mid_stream", after_chunks=2)
    up = make(kind)
    gen = await up.generate("up-m", {"prompt": "x", "max_tokens": 8}, stream=True, request_id="r")
    got = [await gen.first()]
    with pytest.raises(UpstreamError) as info:
        async for d in gen:
            got.append(d)
    await gen.aclose()
    await gen.aclose()  # idempotent
    assert [d.text for d in got] == ["tok0", " tok1"]
    err = info.value
    assert (err.code, err.retryable, err.status) == ("upstream_stream_broken", False, 0)
    assert err.upstream_request_id and err.upstream_request_id.startswith("fake-t-")


async def test_die_before_first_delta_is_retryable(make, fake: FakeUpstream) -> None:
    fake.control(mode="die_mid_stream", after_chunks=0)
    gen = await make("openai").generate("up-m", {**CHAT}, stream=True, request_id="r")
    with pytest.raises(UpstreamError) as info:
        await gen.first()
    await gen.aclose()
    assert (info.value.code, info.value.retryable) == ("upstream_stream_broken", True)


async def test_die_in_non_stream_body_is_retryable(make, fake: FakeUpstream) -> None:
    fake.control(mode="die_mid_stream")
    with pytest.raises(UpstreamError) as info:
        await make("openai").embed("up-m", ["x"], dimensions=None, request_id="r")
    assert (info.value.code, info.value.retryable) == ("upstream_stream_broken", True)


async def test_fail_next_then_ok(make, fake: FakeUpstream) -> None:
    fake.control(mode="status", status=502, fail_next=1)
    up = make("tei")
    with pytest.raises(UpstreamError):
        await up.embed("m", ["x"], dimensions=None, request_id="r")
    assert (await up.embed("m", ["x"], dimensions=None, request_id="r")).vectors.shape == (1, 8)
    assert fake.control()["mode"] == "ok"


async def test_aclose_mid_stream_frees_the_connection(make, fake: FakeUpstream) -> None:
    up = make("openai", max_concurrency=1)
    for _ in range(3):  # with a pool of one, a leaked connection would block the next call
        gen = await up.generate("up-m", {**CHAT, "max_tokens": 50}, stream=True, request_id="r")
        assert (await gen.first()).text == "tok0"
        await gen.aclose()
    texts, _ = await collect(await up.generate("up-m", {**CHAT, "max_tokens": 2}, stream=True, request_id="r"))
    assert len(texts) == 2


# ---------------------------------------------------------------- parsing helpers


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31  # HTTP dates have whole seconds
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_error_message_shapes() -> None:
    assert error_message(b'{"error": {"message": "bad key", "type": "x"}}') == "bad key"
    assert error_message(b'{"error": "Input validation error", "error_type": "validation"}') == "Input validation error"
    assert error_message(b'{"detail": [{"msg": "field required"}]}') == "field required"
    assert error_message(b"<html>gateway down</html>") == "<html>gateway down</html>"


@pytest.mark.parametrize("kind", ["openai", "tgi", "hf"])
async def test_slow_non_stream_answer_is_waited_for_up_to_total_s(make, fake: FakeUpstream, kind: str) -> None:
    """A non-streamed generation sends its headers only when done: first_byte_s does not bound it."""
    fake.control(mode="slow_first_byte", delay_ms=800)
    up = make(kind, timeouts={"connect_s": 2, "first_byte_s": 0.2, "total_s": 20})
    request = {**CHAT, "max_tokens": 2} if kind == "openai" else {"prompt": "p", "max_tokens": 2}
    texts, final = await collect(await up.generate("acme/gen", request, stream=False, request_id="r"))
    assert "".join(d.text for d in texts) == words(2) and final.completion_tokens == 2


async def test_hf_task_paths_and_raw_body_headers(make, fake: FakeUpstream) -> None:
    up = make("hf", models={"acme/vec": None, "acme/img": None})
    await up.hf_task("acme/vec", "feature-extraction", b'{"inputs": ["a"]}', request_id="r")
    pair = b'{"inputs": {"source_sentence": "a", "sentences": ["a", "b"]}}'
    scores = orjson.loads((await up.hf_task("acme/vec", "sentence-similarity", pair, request_id="r")).content)
    assert len(scores) == 2 and abs(scores[0] - 1) < 1e-6
    image = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    reply = await up.hf_task("acme/img", "image-classification", image, request_id="r", content_type="image/png",
                             wait_for_model=True, use_cache=False)  # fmt: skip
    assert orjson.loads(reply.content) == [{"label": f"image/png:{len(image)}", "score": 1.0}]
    seen = fake.requests()
    assert [r["path"] for r in seen] == [
        "/models/acme/vec/pipeline/feature-extraction",
        "/models/acme/vec/pipeline/sentence-similarity",
        "/models/acme/img",
    ]
    headers = seen[-1]["headers"]
    assert (headers["content-type"], headers["x-wait-for-model"], headers["x-use-cache"]) == (
        "image/png",
        "true",
        "false",
    )
    assert "x-wait-for-model" not in seen[0]["headers"] and seen[0]["headers"]["content-type"] == "application/json"


async def test_redirect_is_not_followed(make, fake: FakeUpstream) -> None:
    """A redirect means a wrong base_url: it fails over (retryable), the POST is never re-sent."""
    fake.control(mode="status", status=307, location=fake.url + "/embed", fail_next=1)
    with pytest.raises(UpstreamError) as info:
        await make("tei").embed("m", ["x"], dimensions=None, request_id="r")
    assert (info.value.status, info.value.retryable) == (307, True) and len(fake.requests()) == 1


async def raw_stream(make, fake: FakeUpstream, body: str, kind: str = "openai") -> list[Delta]:
    """The deltas of a stream whose body is `body` as it is (raises what the stream raises)."""
    fake.control(mode="raw_sse", sse_body=body)
    gen = await make(kind).generate("up-m", {**CHAT}, stream=True, request_id="r")
    got: list[Delta] = []
    try:
        got.append(await gen.first())
        async for d in gen:
            got.append(d)
    finally:
        await gen.aclose()
    return got


def chunk(text: str) -> str:
    return orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}).decode()


@pytest.mark.parametrize("payload", ["[1, 2]", '"text"', "3", "null"])
async def test_sse_event_not_an_object_is_a_bad_response(make, fake: FakeUpstream, payload: str) -> None:
    with pytest.raises(UpstreamError) as info:
        await raw_stream(make, fake, f"data: {payload}\n\n")
    assert (info.value.code, info.value.retryable) == ("upstream_bad_response", True)
    with pytest.raises(UpstreamError) as info:  # after output: not retryable
        await raw_stream(make, fake, f"data: {chunk('a')}\n\ndata: {payload}\n\n")
    assert (info.value.code, info.value.retryable) == ("upstream_bad_response", False)


async def test_sse_fields_comments_and_multiline_data(make, fake: FakeUpstream) -> None:
    """Multi-line data joins with a newline; comments, id:, retry: and other event names are skipped;
    the last event needs no blank line before the body ends."""
    split = '{"choices": [{"index": 0,\ndata: "delta": {"content": "b"}, "finish_reason": null}]}'
    body = (f": hello\nretry: 100\nid: 1\nevent: message\ndata: {chunk('a')}\r\n\r\n"
            f"event: ping\nid: 2\ndata: {split}\n\n"
            'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]')  # fmt: skip
    got = await raw_stream(make, fake, body)
    assert [d.text for d in got] == ["a", "b", ""] and got[-1].final and got[-1].finish_reason == "stop"


async def test_sse_event_error_field(make, fake: FakeUpstream) -> None:
    with pytest.raises(UpstreamError) as info:
        await raw_stream(make, fake, f"data: {chunk('a')}\n\nevent: error\ndata: model crashed\n\n")
    assert (info.value.code, info.value.retryable) == ("upstream_stream_error", False)
    assert info.value.message == "p-openai: model crashed"
    with pytest.raises(UpstreamError) as info:
        await raw_stream(make, fake, 'event: error\ndata: {"message": "overloaded"}\n\n')
    assert (info.value.code, info.value.retryable) == ("upstream_stream_error", True)


async def test_sse_line_over_the_limit_is_a_bad_response(make, fake: FakeUpstream) -> None:
    with pytest.raises(UpstreamError) as info:
        await raw_stream(make, fake, "data: " + "x" * (3 << 20) + "\n\n")
    assert (info.value.code, info.value.retryable) == ("upstream_bad_response", True)


@pytest.mark.parametrize(
    ("event", "kind", "status"),
    [({"error": {"message": "bad", "type": "invalid_request_error"}}, "openai", 400),
     ({"error": {"message": "too long", "type": "BadRequestError", "code": 413}}, "openai", 413),
     ({"error": "Input validation error: max_new_tokens", "error_type": "validation"}, "tgi", 422),
     ({"error": {"message": "busy", "code": 429}}, "openai", 0),
     ({"error": "CUDA out of memory", "error_type": "generation"}, "tgi", 0)],
)  # fmt: skip
async def test_error_event_before_output(make, fake: FakeUpstream, event: dict, kind: str, status: int) -> None:
    """The caller's error (validation) is not retried elsewhere; the upstream's own failure is."""
    with pytest.raises(UpstreamError) as info:
        await raw_stream(make, fake, "data: " + orjson.dumps(event).decode() + "\n\n", kind)
    assert (info.value.status, info.value.retryable) == (status, status == 0)


async def test_all_attempts_unauthorized_names_the_credentials(make, fake: FakeUpstream) -> None:
    """Every provider answered 401/403: UPSTREAM_UNAVAILABLE naming the auth failure, no Retry-After."""
    from services.common.catalog import Catalog
    from services.common.errors import ErrorCode, MeshError
    from services.common.settings import REPO_ROOT
    from services.gateway.providers import Providers
    from services.gateway.providers.config import ProvidersConfig
    from services.gateway.providers.registry import ProviderRegistry

    remote = {"kind": "tei", "base_url": fake.url, "models": {"acme/remote-vec": {"tasks": ["feature-extraction"]}}}
    config = {"routing": {"policy": "preferred", "backoff_base_s": 0.0},
              "providers": [{"name": "tei-a", **remote}, {"name": "tei-b", **remote}]}  # fmt: skip
    registry = ProviderRegistry(ProvidersConfig.model_validate(config), Catalog.load(REPO_ROOT / "catalog.yaml"))
    providers = Providers(registry.config, registry, {})
    ups = {name: make("tei", name=name) for name in ("tei-a", "tei-b")}
    fake.control(mode="status", status=401)
    selection = registry.candidates("acme/remote-vec", "embed")

    async def call(c):
        return await ups[c.provider].embed("m", ["x"], dimensions=None, request_id="r")

    with pytest.raises(MeshError) as info:
        await providers.attempt(selection, call, deadline=time.monotonic() + 30, op="embed")
    err = info.value
    assert err.code is ErrorCode.UPSTREAM_UNAVAILABLE and err.retry_after_s is None
    assert "refused the gateway's credentials" in err.message and "tei-a" in err.message

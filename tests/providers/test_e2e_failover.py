"""Failover end to end through a gateway process and two fake upstream processes (OpenAI dialect):
503 + Retry-After, 429, a slow first byte and a refused connection each move the request to the
other provider with no error to the caller; a circuit breaker stops traffic to a failing provider
and a half-open probe brings it back once the fault is gone. Each test uses a model id of its own,
so breakers, cooldowns and live stats of one test never touch another's."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.providers.conftest import (
    PROVIDER_HEADER,
    openai_provider,
    sse_payloads,
    start_provider_gateway,
    write_providers,
)

pytestmark = pytest.mark.xdist_group("providers-failover")

CHAT_MODELS = (
    "acme/f503",
    "acme/f429",
    "acme/slow",
    "acme/slow-stream",
    "acme/refused",
    "acme/breaker",
    "acme/die",
    "acme/die0",
    "acme/die-tgi",
)
EMBED_MODELS = ("acme/e503", "acme/eslow")
HELLO = [{"role": "user", "content": "one two three"}]
BREAKER = {"failures": 3, "open_s": 1.0, "half_open_probes": 1}


def models() -> dict:
    chat = {m: {"upstream": m, "tasks": ["text-generation"]} for m in CHAT_MODELS}
    embed = {m: {"upstream": m, "tasks": ["feature-extraction"]} for m in EMBED_MODELS}
    return {**chat, **embed}


@pytest.fixture(scope="module")
def duo(fakes, tmp_path_factory):
    """fake-a (first in `preferred` order, a short first-byte timeout) and fake-b, both serving every
    model of this module, behind one gateway (auth off, ledger on)."""
    a, b = fakes["start"]("fake-a"), fakes["start"]("fake-b")
    tmp = tmp_path_factory.mktemp("failover")
    providers = [
        openai_provider(
            "fake-a", a.url + "/v1", models(), timeouts={"connect_s": 1, "first_byte_s": 0.5, "total_s": 2}
        ),
        openai_provider("fake-b", b.url + "/v1", models()),
    ]
    gateway = start_provider_gateway(tmp, write_providers(tmp / "providers.yaml", providers, {"breaker": BREAKER}))
    yield gateway, a, b
    gateway.stop()


@pytest.fixture(autouse=True)
def clean(duo):
    _, a, b = duo
    for fake in (a, b):
        fake.reset()
        fake.clear()
    yield
    for fake in (a, b):
        fake.reset()


def served(fake, model: str) -> int:
    """Requests for `model` the fake received (answered or not)."""
    return sum(1 for r in fake.requests() if isinstance(r["body"], dict) and r["body"].get("model") == model)


def chat(url: str, model: str, *, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 4, "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def assert_all_from_b(replies: list[httpx.Response]) -> None:
    assert [r.status_code for r in replies] == [200] * len(replies), [
        r.text[:200] for r in replies if r.status_code != 200
    ]
    assert {r.headers.get(PROVIDER_HEADER) for r in replies} == {"fake-b"}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_503_with_retry_after_fails_over_and_cools_the_provider(duo, stream):
    gateway, a, b = duo
    model = "acme/f503"
    a.control(mode="status", status=503, retry_after="8")
    replies = [chat(gateway.url, model, stream=stream) for _ in range(10)]
    assert_all_from_b(replies)
    if stream:
        assert all(r.text.rstrip().endswith("data: [DONE]") for r in replies)
    tried = served(a, model)
    # The first request met the 503 and its Retry-After cooled fake-a for this model: the requests
    # after it went to fake-b without asking fake-a again (each test's cooldown is its own model's,
    # and the second parametrization starts while the first one's cooldown may still run).
    assert tried <= 1 and served(b, model) == 10
    rows = gateway.ledger_rows("model = ?", (model,))
    assert {r["provider"] for r in rows} == {"fake-b"} and {r["status"] for r in rows} == {200}


def test_429_fails_over_with_no_error_to_the_caller(duo):
    gateway, a, _ = duo
    a.control(mode="status", status=429)
    replies = [chat(gateway.url, "acme/f429") for _ in range(6)]
    assert_all_from_b(replies)
    assert served(a, "acme/f429") >= 1  # it was tried, and its 429 moved the request on
    assert any(int(r.headers.get("x-meshserve-attempts", "1")) >= 2 for r in replies)


def test_embeddings_503_fail_over(duo):
    gateway, a, _ = duo
    a.control(mode="status", status=503)
    replies = [
        httpx.post(gateway.url + "/v1/embeddings", json={"model": "acme/e503", "input": ["x", "y"]}, timeout=60)
        for _ in range(6)
    ]
    assert_all_from_b(replies)
    assert all(len(r.json()["data"]) == 2 for r in replies)
    assert served(a, "acme/e503") >= 1


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_slow_first_byte_fails_over(duo, stream):
    gateway, a, _ = duo
    # fake-a answers after 5 s: a stream's first token is due within first_byte_s (0.5 s), a
    # non-streamed generation (its headers come when it is done) within total_s (2 s).
    a.control(mode="slow_first_byte", delay_ms=5000)
    model = "acme/slow-stream" if stream else "acme/slow"  # breakers are per model: one per case
    replies = [chat(gateway.url, model, stream=stream) for _ in range(4)]
    assert_all_from_b(replies)
    assert served(a, model) >= 1


def test_slow_first_byte_of_embeddings_fails_over(duo):
    gateway, a, _ = duo
    a.control(mode="slow_first_byte", delay_ms=5000)
    replies = [
        httpx.post(gateway.url + "/v1/embeddings", json={"model": "acme/eslow", "input": "x"}, timeout=60)
        for _ in range(4)
    ]
    assert_all_from_b(replies)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_refused_connection_fails_over(duo, stream):
    gateway, a, _ = duo
    a.control(mode="refuse")  # its listener is closed: connections are refused
    replies = [chat(gateway.url, "acme/refused", stream=stream) for _ in range(5)]
    assert_all_from_b(replies)
    rows = gateway.ledger_rows("model = ?", ("acme/refused",))
    assert {r["provider"] for r in rows} == {"fake-b"}


def events_of(reply: httpx.Response) -> list:
    return sse_payloads(reply.text)


def test_a_provider_dying_mid_stream_ends_it_with_an_error_event_and_bills_what_was_delivered(duo):
    gateway, a, b = duo
    a.control(mode="die_mid_stream", after_chunks=3)  # three tokens, then the connection drops
    reply = chat(gateway.url, "acme/die", stream=True)
    assert reply.status_code == 200 and reply.headers.get(PROVIDER_HEADER) == "fake-a"
    events = events_of(reply)
    last = events[-1]
    assert isinstance(last, dict) and "error" in last and "[DONE]" not in events, events[-3:]
    delivered = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e.get("choices", []))
    assert delivered == "tok0 tok1 tok2"
    assert served(b, "acme/die") == 0  # a started stream is never retried elsewhere
    (row,) = gateway.ledger_rows("request_id = ?", (reply.headers["x-request-id"],))
    assert row["provider"] == "fake-a" and row["output_tokens"] == 3
    # The openai SDK, unmodified, raises the error event as an APIError (never a cut connection).
    client = OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError) as err:
        for _ in client.chat.completions.create(model="acme/die", messages=HELLO, max_tokens=4, stream=True):
            pass
    assert not isinstance(err.value, openai.APIConnectionError)


def test_a_provider_dying_mid_stream_ends_a_tgi_stream_with_a_tgi_error_event(duo):
    gateway, a, b = duo
    a.control(mode="die_mid_stream", after_chunks=3)
    body = {"inputs": "one two", "parameters": {"max_new_tokens": 6}, "stream": True}
    reply = httpx.post(f"{gateway.url}/models/acme/die-tgi", json=body, timeout=60)
    assert reply.status_code == 200 and reply.headers.get(PROVIDER_HEADER) == "fake-a"
    events = events_of(reply)
    tokens = [e["token"]["text"] for e in events[:-1]]
    assert tokens and "".join(tokens) in "tok0 tok1 tok2"  # at most what fake-a sent before it died
    assert isinstance(events[-1].get("error"), str) and events[-1].get("error_type"), events[-1]
    assert served(b, "acme/die-tgi") == 0
    (row,) = gateway.ledger_rows("request_id = ?", (reply.headers["x-request-id"],))
    assert row["provider"] == "fake-a" and row["output_tokens"] == len(tokens)  # billed: what was delivered


def test_a_provider_dying_before_the_first_token_fails_over(duo):
    gateway, a, _ = duo
    a.control(mode="die_mid_stream", after_chunks=0)  # headers, then the connection drops
    replies = [chat(gateway.url, "acme/die0", stream=True) for _ in range(4)]
    assert_all_from_b(replies)
    assert all(events_of(r)[-1] == "[DONE]" for r in replies)
    assert served(a, "acme/die0") >= 1


def breaker_state(gateway, model: str) -> float | None:
    return gateway.metric("meshserve_provider_breaker_state", provider="fake-a", model=model)


def test_open_breaker_stops_traffic_and_a_half_open_probe_brings_it_back(duo):
    gateway, a, _ = duo
    model = "acme/breaker"
    a.control(mode="status", status=500)
    # `preferred` puts fake-a first: each request tries it, fails over, until 3 failures in a row
    # open its breaker for this model.
    for _ in range(BREAKER["failures"]):
        assert chat(gateway.url, model).headers.get(PROVIDER_HEADER) == "fake-b"
    assert served(a, model) == BREAKER["failures"]
    assert breaker_state(gateway, model) in (1.0, 2.0)
    n = 30
    replies = [chat(gateway.url, model) for _ in range(n)]
    assert_all_from_b(replies)
    probes = served(a, model) - BREAKER["failures"]
    # Open: no traffic. Only half-open probes (one per open_s = 1 s, each failing and re-opening it)
    # may reach fake-a; without the breaker every one of the n requests would have.
    assert probes <= n // 3, probes
    opened = gateway.metric("meshserve_provider_breaker_transitions_total", provider="fake-a", model=model, to="open")
    assert opened is not None and opened >= 1

    a.reset()  # the fault is gone: after open_s a probe succeeds and closes the breaker
    back = None
    deadline = time.monotonic() + 60
    for _ in range(2000):
        reply = chat(gateway.url, model)
        assert reply.status_code == 200, reply.text
        if reply.headers.get(PROVIDER_HEADER) == "fake-a":
            back = reply
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert back is not None, "fake-a never got traffic back after its fault was cleared"
    after = [chat(gateway.url, model) for _ in range(5)]
    assert {r.headers.get(PROVIDER_HEADER) for r in after} == {"fake-a"}
    assert breaker_state(gateway, model) == 0.0

"""Selection end to end through a gateway process and two fake upstream processes: `:fastest` moves
to the faster provider soon after a latency change, `:cheapest` follows the prices in providers.yaml
(and the ledger charges the answering provider's price on the upstream's token counts), and an
explicit provider (`id:provider`, `/{provider}/v1/...`) is never failed over."""

from __future__ import annotations

import httpx
import pytest

from tests.providers.conftest import PROVIDER_HEADER, openai_provider, start_provider_gateway, write_providers

pytestmark = pytest.mark.xdist_group("providers-selection")

HELLO = [{"role": "user", "content": "one two three"}]  # 3 prompt tokens at the fake (it counts words)
CHEAP = {"input_per_1k_tokens_usd": 0.1, "output_per_1k_tokens_usd": 0.2, "per_request_usd": 0.001}
DEAR = {"input_per_1k_tokens_usd": 0.3, "output_per_1k_tokens_usd": 0.9, "per_request_usd": 0.002}


def chat_model(upstream: str, **extra) -> dict:
    return {"upstream": upstream, "tasks": ["text-generation"], **extra}


@pytest.fixture(scope="module")
def pair(fakes, tmp_path_factory):
    """fake-1 and fake-2 serving the same models (fake-1 first in file order), one gateway whose
    default policy is fastest. Prices: fake-2's provider pricing is the cheaper; the models
    acme/cheap-1 and acme/cheap-2 have prices of their own that win over the provider's."""
    f1, f2 = fakes["start"]("fake-1"), fakes["start"]("fake-2")
    tmp = tmp_path_factory.mktemp("selection")
    fast = {"acme/fast": chat_model("acme/fast")}

    def models(cheap_one: bool) -> dict:
        return {
            **fast,
            "acme/cheap-1": chat_model("acme/cheap-1", pricing=CHEAP if cheap_one else DEAR),
            "acme/cheap-2": chat_model("acme/cheap-2", pricing=DEAR if cheap_one else CHEAP),
            "acme/cheap-p": chat_model("acme/cheap-p"),  # priced by the provider's own pricing
            "acme/explicit": chat_model("acme/explicit"),
            "acme/explicit-embed": {"upstream": "acme/explicit-embed", "tasks": ["feature-extraction"]},
        }

    providers = [
        openai_provider("fake-1", f1.url + "/v1", models(True), pricing=DEAR),
        openai_provider("fake-2", f2.url + "/v1", models(False), pricing=CHEAP),
    ]
    yaml_path = write_providers(tmp / "providers.yaml", providers, {"policy": "fastest", "probe_after_s": 0.5})
    gateway = start_provider_gateway(tmp, yaml_path)
    yield gateway, f1, f2
    gateway.stop()


@pytest.fixture(autouse=True)
def clean(pair):
    _, f1, f2 = pair
    for fake in (f1, f2):
        fake.reset()
        fake.clear()
    yield
    for fake in (f1, f2):
        fake.reset()


def served(fake, model: str) -> int:
    return sum(1 for r in fake.requests() if isinstance(r["body"], dict) and r["body"].get("model") == model)


def answered_by(client: httpx.Client, model: str) -> str:
    reply = client.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    return reply.headers[PROVIDER_HEADER]


def settles_on(url: str, model: str, provider: str, max_requests: int, window: int = 10) -> int | None:
    """Requests sent until at least 8 of the last `window` answers came from `provider` (None: not
    within max_requests). Not all of them: `fastest` re-measures the other one every probe_after_s."""
    last: list[str] = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(1, max_requests + 1):
            last = [*last[-(window - 1) :], answered_by(client, model)]
            if len(last) == window and last.count(provider) >= window - 2:
                return i
    return None


def test_fastest_moves_to_the_faster_provider_after_a_latency_change(pair):
    gateway, f1, f2 = pair
    model = "acme/fast:fastest"
    f2.control(latency_ms=80)
    assert settles_on(gateway.url, model, "fake-1", 60) is not None, "fastest never settled on the fast fake-1"
    f1.control(latency_ms=200)  # fake-1 becomes the slow one
    f2.control(latency_ms=0)
    # fake-1's own answers raise its live latency at once; fake-2 is re-measured within
    # probe_after_s (0.5 s): a bounded number of requests, whatever the machine's speed.
    taken = settles_on(gateway.url, model, "fake-2", 40)
    assert taken is not None, "fastest did not move to fake-2 within 40 requests"
    latency = gateway.metric("meshserve_provider_latency_seconds", provider="fake-1", model="acme/fast")
    assert latency is not None and latency > gateway.metric(
        "meshserve_provider_latency_seconds", provider="fake-2", model="acme/fast"
    )


@pytest.mark.parametrize(
    ("model", "cheaper"), [("acme/cheap-1", "fake-1"), ("acme/cheap-2", "fake-2"), ("acme/cheap-p", "fake-2")]
)
def test_cheapest_follows_the_prices_and_the_ledger_charges_them(pair, model, cheaper):
    gateway, f1, f2 = pair
    body = {"model": f"{model}:cheapest", "messages": HELLO, "max_tokens": 5}
    replies = [httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60) for _ in range(6)]
    assert [r.status_code for r in replies] == [200] * 6, replies[0].text
    assert {r.headers[PROVIDER_HEADER] for r in replies} == {cheaper}
    other = f2 if cheaper == "fake-1" else f1
    assert served(other, model) == 0
    ids = {r.headers["x-request-id"] for r in replies}
    sent = f1 if cheaper == "fake-1" else f2
    assert {r["headers"].get("x-request-id") for r in sent.requests() if r["body"].get("model") == model} == ids
    rows = [r for r in gateway.ledger_rows("model = ?", (model,)) if r["request_id"] in ids]
    assert len(rows) == 6 and {r["provider"] for r in rows} == {cheaper}
    # The fake reports usage (3 prompt words, 5 tokens): cost at the cheaper provider's prices.
    want = (
        3 / 1000 * CHEAP["input_per_1k_tokens_usd"]
        + 5 / 1000 * CHEAP["output_per_1k_tokens_usd"]
        + CHEAP["per_request_usd"]
    )
    for row in rows:
        assert (row["input_tokens"], row["output_tokens"]) == (3, 5)
        assert row["cost_usd"] == pytest.approx(want)


def test_explicit_provider_never_fails_over(pair):
    gateway, f1, f2 = pair
    f1.control(mode="status", status=503)
    chat = {"messages": HELLO, "max_tokens": 4}
    calls = [
        ("/v1/chat/completions", {**chat, "model": "acme/explicit:fake-1"}),
        ("/v1/chat/completions", {**chat, "model": "acme/explicit:fake-1", "stream": True}),
        ("/fake-1/v1/chat/completions", {**chat, "model": "acme/explicit"}),
        ("/fake-1/v1/embeddings", {"model": "acme/explicit-embed", "input": "x"}),
        ("/v1/embeddings", {"model": "acme/explicit-embed:fake-1", "input": "x"}),
    ]
    for path, body in calls:
        reply = httpx.post(gateway.url + path, json=body, timeout=60)
        assert reply.status_code >= 500, (path, reply.status_code, reply.text)
        assert "error" in reply.json(), reply.text
    assert served(f1, "acme/explicit") >= 1 and served(f1, "acme/explicit-embed") >= 1
    assert served(f2, "acme/explicit") == 0 and served(f2, "acme/explicit-embed") == 0
    # The same explicit request to the healthy provider is answered by it.
    ok = httpx.post(gateway.url + "/v1/chat/completions", json={**chat, "model": "acme/explicit:fake-2"}, timeout=60)
    assert ok.status_code == 200 and ok.headers[PROVIDER_HEADER] == "fake-2"

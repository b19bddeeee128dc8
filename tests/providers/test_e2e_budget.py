"""A key's budget is never overspent by concurrent streams routed to providers with different
prices: the gateway (auth on) reserves each request at the worst price among its candidates and
settles at the answering provider's; some streams are refused with 429 and the ledger's total for
the key stays within the budget."""

from __future__ import annotations

import pytest

from tests.providers.conftest import (
    Outcome,
    bounded_load,
    openai_provider,
    start_provider_gateway,
    stream_one,
    write_providers,
)

pytestmark = pytest.mark.xdist_group("providers-budget")

MODEL = "acme/budget-chat"
TOKENS = 10  # the fake generates exactly max_tokens
LOW, HIGH = 1.0, 3.0  # USD per 1k output tokens: a stream costs $0.01 at fake-lo, $0.03 at fake-hi
BUDGET = 0.1


@pytest.fixture(scope="module")
def priced(fakes, tmp_path_factory):
    lo, hi = fakes["start"]("fake-lo"), fakes["start"]("fake-hi")
    for fake in (lo, hi):
        fake.control(tokens_per_s=100)  # streams overlap: reservations are held concurrently
    tmp = tmp_path_factory.mktemp("budget")

    def provider(name, fake, price):
        model = {"upstream": MODEL, "tasks": ["text-generation"], "pricing": {"output_per_1k_tokens_usd": price}}
        return openai_provider(name, fake.url + "/v1", {MODEL: model})

    providers = [provider("fake-lo", lo, LOW), provider("fake-hi", hi, HIGH)]
    gateway = start_provider_gateway(tmp, write_providers(tmp / "providers.yaml", providers), auth=True)
    yield gateway, lo
    gateway.stop()


def test_concurrent_streams_across_priced_providers_never_overspend(priced):
    gateway, lo = priced
    key = gateway.create_key(budget_usd=BUDGET, budget_period="day")
    headers = {"authorization": f"Bearer {key['token']}"}
    body = {"model": f"{MODEL}:cheapest", "messages": [{"role": "user", "content": "spend"}], "max_tokens": TOKENS,
            "stream": True}  # fmt: skip

    async def one(client, i: int) -> Outcome:
        return await stream_one(client, gateway.url + "/v1/chat/completions", body, headers)

    (first,) = bounded_load(1, 1, one)
    assert first.ok and first.provider == "fake-lo"  # the cheap one, when it is healthy
    # Now the cheap provider fails the next requests: they fail over to the dear one, which costs
    # three times what `cheapest` expected. Each stream held the dear price before it started.
    lo.control(mode="status", status=503, fail_next=6)
    outcomes = bounded_load(48, 16, one)
    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    assert len(ok) + len(refused) == 48, [(o.status, o.error) for o in outcomes if o.status not in (200, 429)]
    assert ok and refused
    assert all(o.events[-1] == "[DONE]" for o in ok)
    assert all("budget" in (o.error or "").lower() for o in refused), refused[0].error
    assert "fake-hi" in {o.provider for o in ok}
    rows = gateway.ledger_rows("key_id = ?", (key["id"],))
    assert len(rows) == 49
    spent = sum(r["cost_usd"] for r in rows)
    assert spent <= BUDGET + 1e-9, spent
    for row in rows:
        if row["status"] == 200:
            price = LOW if row["provider"] == "fake-lo" else HIGH
            assert row["cost_usd"] == pytest.approx(TOKENS / 1000 * price), row
        else:
            assert row["cost_usd"] == 0, row  # a refused request costs nothing

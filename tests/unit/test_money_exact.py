"""Money is exact from the price to the budget: prices are parsed as decimals from their text, a
cost is Decimal arithmetic rounded once to the nano-dollar, and the usage ledger (SQLite and a real
Postgres), the budgets (in process and a real Redis) and the X-Usage-Cost-USD header all count the
same nano-dollars. Each case below fails with float arithmetic: 0.1 + 0.1 + 0.1 > 0.3 in binary, and
budgets counted in micro-dollars never charged a cost of $0.000000123."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
import redis.asyncio as aioredis
import yaml

from services.common.catalog import PricingSpec, load_entry
from services.common.errors import ErrorCode, MeshError
from services.common.money import DecimalFloat, load_yaml, usd
from services.gateway.control import redis_scripts
from services.gateway.control.budgets import period_key
from services.gateway.control.metering import Metering
from services.gateway.control.redis_store import RedisControlStore
from services.gateway.ledger import UsageLedger
from tests.unit import test_ledger
from tests.unit.test_ratelimit_budgets import _key, _principal, _sentiment, new_key, open_store, storage_uri

# test_ledger's databases (a SQLite file, a database on a real Postgres server); the stores of
# test_ratelimit_budgets (in process, a real Redis).
postgres_server, database_url, engines = test_ledger.postgres_server, test_ledger.database_url, test_ledger.engines
__all__ = ["storage_uri"]


def test_prices_are_parsed_from_their_text_never_through_a_float():
    digits = "0.1000000000000000001"  # more digits than a double holds: float() would drop the 1
    parsed = load_yaml(f"price: {digits}\nother: 2.5\nname: x\n")
    assert isinstance(parsed["price"], DecimalFloat) and parsed["price"].exact == Decimal(digits)
    assert parsed["other"] == 2.5 and parsed["name"] == "x"  # still floats (and everything else as before)
    pricing = PricingSpec(input_per_1k_tokens_usd=parsed["price"], per_request_usd="0.000000123")
    assert pricing.input_per_1k_tokens_usd.exact == Decimal(digits)
    assert pricing.per_request_usd.exact == Decimal("0.000000123") and pricing.per_request_usd == 1.23e-7
    assert PricingSpec(output_per_1k_tokens_usd=0.1).output_per_1k_tokens_usd.exact == Decimal("0.1")
    for bad in ("-1", "ten", float("nan")):
        with pytest.raises(ValueError):
            PricingSpec(per_request_usd=bad)
    with pytest.raises(ValueError, match="too large"):  # not decimal.InvalidOperation
        usd(1e305)


def test_a_catalog_entry_file_keeps_its_prices_exact(tmp_path):
    source = _sentiment().model_dump(mode="json")
    source["pricing"] = {"input_per_1k_tokens_usd": 1, "per_request_usd": 1}
    text = yaml.safe_dump(source)
    text = text.replace("input_per_1k_tokens_usd: 1", "input_per_1k_tokens_usd: 0.000041")
    text = text.replace("per_request_usd: 1", "per_request_usd: 0.30000000000000000001")
    (tmp_path / "entry.yaml").write_text(text)
    pricing = load_entry(tmp_path / "entry.yaml").pricing
    assert pricing.per_request_usd.exact == Decimal("0.30000000000000000001")
    assert pricing.cost(3, 0, 0.0) == Decimal("0.30000000000000000001") + Decimal("0.000000123")


def test_a_cost_is_decimal_arithmetic_on_the_written_prices():
    pricing = PricingSpec(input_per_1k_tokens_usd="0.000041", per_compute_second_usd="0.1")
    assert pricing.cost(3, 0, 0.0) == Decimal("0.000000123")
    assert 0.7 * 0.1 != 0.07 and pricing.cost(0, 0, 0.7) == Decimal("0.07")  # floats: 0.06999999999999999


# -- one cost, N requests: the ledger and the budget both count exactly N times it -------------------
CASES = {
    # the prices, the cost of a request of 3 input tokens, and how many requests the budget buys
    "0.1x3": ({"per_request_usd": "0.1"}, Decimal("0.1"), 3),  # 0.1 + 0.1 + 0.1 > 0.3 in floats
    "123-nano-dollars": ({"input_per_1k_tokens_usd": "0.000041"}, Decimal("0.000000123"), 1000),  # 0 micro-dollars
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
async def test_a_budget_of_n_costs_admits_exactly_n_requests_and_the_ledger_sums_them_exactly(
    case, storage_uri, engines
):
    prices, cost, n = CASES[case]
    entry = _sentiment().model_copy(update={"pricing": PricingSpec(**prices)})
    assert entry.pricing.cost(3, 0, 0.0) == cost
    key = _key(budget_usd=n * cost, budget_period="day")
    store, ledger = open_store(storage_uri), UsageLedger(engines(), flush_interval_s=3600)
    await ledger.start()
    metering = Metering(store, ledger, timeout_s=0.0)  # (no compute price: a request holds its exact cost)

    async def one(i: int) -> str:
        try:
            metered = await metering.admit(_principal(key), entry, "text-classification", "/t", f"r{i}-{key.id}",
                                           max_input_tokens=3)  # fmt: skip
        except MeshError as err:
            return err.code.name
        async with metering.track(metered):
            await asyncio.sleep(0)  # every admission holds before any settles
            metered.add(input_tokens=3)
        assert metered.headers()["X-Usage-Cost-USD"] == f"{cost:.9f}"
        return "ok"

    try:
        results = await asyncio.gather(*(one(i) for i in range(n + 1)))
        assert results.count("ok") == n and results.count(ErrorCode.QUOTA_EXCEEDED.name) == 1
        assert await store.spent(key.id, "day") == (n * cost, 0)
        await ledger.flush()
        [total] = await ledger.totals(by="key", key_id=key.id)
        assert total["requests"] == n + 1 and Decimal(str(total["cost_usd"])) == n * cost
        rows = await ledger.query(key_id=key.id, limit=n + 1)
        assert sum(Decimal(str(row["cost_usd"])) for row in rows) == n * cost
    finally:
        await ledger.close()
        await store.close()


async def test_redis_budgets_count_exactly_beyond_what_a_double_holds(redis_url):
    """Lua's numbers are doubles (exact to 2**53 ~ 9e15 nano-dollars = $9M): the scripts never add
    amounts as Lua numbers, so a budget of $100M is still counted to the nano-dollar."""
    store, key = RedisControlStore(redis_url), new_key()
    budget = Decimal("100000000")
    try:
        big = await store.admit(key, None, 0, budget, "total", budget - Decimal("0.000000002"))
        last = await store.admit(key, None, 0, budget, "total", Decimal("0.000000001"))
        also = await store.admit(key, None, 0, budget, "total", Decimal("0.000000001"))
        with pytest.raises(MeshError, match="budget exceeded"):
            await store.admit(key, None, 0, budget, "total", Decimal("0.000000001"))
        for ticket in (big, last, also):
            await store.finish(ticket, 0, ticket.reservation.amount_usd)
        assert await store.spent(key, "total") == (budget, 0)
    finally:
        await store.close()


async def test_redis_carries_over_what_a_release_counting_micro_dollars_spent(redis_url):
    """A period's account opened by a release before nano-dollars (its micro-dollar totals) goes on
    counting here: what it spent, and what it held (as spent: its holds settle in the old keys)."""
    store, key = RedisControlStore(redis_url), new_key()
    client = aioredis.Redis.from_url(redis_url)
    period = period_key("day", store.periods.now())
    legacy = redis_scripts.budget_keys(key, period)[3]
    try:
        await client.hset(legacy, mapping={"spent": 250_000, "reserved": 100_000})  # $0.25 spent, $0.10 held
        assert await store.spent(key, "day") == (Decimal("0.35"), 0)
        await store.admit(key, None, 0, Decimal("1"), "day", Decimal("0.65"))
        with pytest.raises(MeshError, match=r"\$0\.35 is spent and \$0\.65 held"):
            await store.admit(key, None, 0, Decimal("1"), "day", Decimal("0.000000001"))
    finally:
        await client.aclose()
        await store.close()

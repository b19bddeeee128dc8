"""The service layer of providers: metering at the dearest candidate's price and settling at the
answering one's, the ledger's provider fields (and old ledgers migrated), keys limited to
providers, and RoutingService over a real Providers with fake remote upstreams."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from services.common.catalog import PricingSpec
from services.common.errors import ErrorCode, MeshError
from services.gateway.control.auth import Principal
from services.gateway.control.keys import ApiKey, KeyStore
from services.gateway.control.local_store import LocalControlStore
from services.gateway.control.metering import Metering
from services.gateway.db import make_engine
from services.gateway.ledger.schema import FIELDS, create_usage_table, usage
from services.gateway.ledger.writer import insert_rows

CHEAP = PricingSpec(input_per_1k_tokens_usd=0.001, output_per_1k_tokens_usd=0.002)
DEAR = PricingSpec(input_per_1k_tokens_usd=0.01, output_per_1k_tokens_usd=0.03, per_request_usd=0.001)


class RemoteOnly:
    """A model only remote providers serve (what metering needs of it: an id and a price)."""

    def __init__(self, model_id: str = "acme/remote-chat", pricing: PricingSpec | None = None) -> None:
        self.id = model_id
        self.pricing = pricing or PricingSpec()


def _principal(**fields) -> Principal:
    return Principal(ApiKey(id=uuid.uuid4().hex[:12], name="t", scopes=("inference",), **fields))


class ListLedger:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def append(self, row: tuple) -> None:
        self.rows.append(row)

    def record(self, name: str, index: int = -1):
        return self.rows[index][FIELDS.index(name)]


# -- metering -----------------------------------------------------------------------------------
async def test_admission_holds_the_given_price_and_settles_at_the_answering_one():
    store, ledger = LocalControlStore(), ListLedger()
    metering = Metering(store, ledger, timeout_s=1.0)
    principal = _principal(budget_usd=10.0)
    try:
        metered = await metering.admit(
            principal, RemoteOnly(), "text-generation", "/v1/chat/completions", "r1",
            max_input_tokens=1000, max_output_tokens=1000, pricing=DEAR,
        )  # fmt: skip
        spent, held = await store.spent(principal.key_id, "month")
        assert spent == 0 and held == pytest.approx(DEAR.cost(1000, 1000, 1.0))
        metered.pricing, metered.provider, metered.attempts = CHEAP, "mesh-b", 2
        metered.upstream_request_id = "fake-b-7"
        async with metering.track(metered):
            metered.add(input_tokens=10, output_tokens=20, items=1)
        spent, held = await store.spent(principal.key_id, "month")
        assert held == 0 and spent == pytest.approx(CHEAP.cost(10, 20, 0.0), abs=1e-9)
    finally:
        await store.close()
    assert ledger.record("provider") == "mesh-b" and ledger.record("attempts") == 2
    assert ledger.record("upstream_request_id") == "fake-b-7"
    assert ledger.record("cost_usd") == pytest.approx(CHEAP.cost(10, 20, 0.0))


async def test_a_failed_request_costs_nothing_unless_its_stream_delivered_tokens():
    ledger = ListLedger()
    metering = Metering(None, ledger, timeout_s=1.0)
    for request_id, delivered in (("quiet", False), ("delivered", True)):
        metered = await metering.admit(
            _principal(), RemoteOnly(pricing=CHEAP), "text-generation", "/v1/completions", request_id,
            max_input_tokens=5,
        )  # fmt: skip
        metered.add(input_tokens=5, output_tokens=3)
        metered.delivered = delivered
        await metering.finish(metered, 502)
    assert ledger.record("cost_usd", 0) == 0.0
    assert ledger.record("cost_usd", 1) == pytest.approx(CHEAP.cost(5, 3, 0.0)) and ledger.record("status", 1) == 502


async def test_a_local_request_keeps_the_entry_price_and_local_row_defaults():
    ledger = ListLedger()
    metering = Metering(None, ledger, timeout_s=1.0)
    entry = RemoteOnly("meshserve/x", pricing=CHEAP)
    metered = await metering.admit(_principal(), entry, "feature-extraction", "/v1/embeddings", "l", max_input_tokens=5)
    assert metered.pricing is CHEAP and metered.provider == "local" and not metered.delivered
    await metering.finish(metered, 200)
    assert len(ledger.rows[0]) == len(FIELDS)
    assert (ledger.record("provider"), ledger.record("attempts"), ledger.record("upstream_request_id")) == (
        "local", 1, None,
    )  # fmt: skip


async def test_a_budget_refusal_at_the_dearest_price_gets_a_row_without_cost():
    store, ledger = LocalControlStore(), ListLedger()
    metering = Metering(store, ledger, timeout_s=1.0)
    try:
        with pytest.raises(MeshError) as refused:
            await metering.admit(
                _principal(budget_usd=0.01), RemoteOnly(pricing=CHEAP), "text-generation", "/v1/completions", "r",
                max_input_tokens=1000, max_output_tokens=1000, pricing=DEAR,
            )  # fmt: skip
    finally:
        await store.close()
    assert refused.value.code is ErrorCode.QUOTA_EXCEEDED
    assert ledger.record("cost_usd") == 0.0 and ledger.record("status") == refused.value.code.http_status


# -- the ledger ---------------------------------------------------------------------------------
def test_an_older_ledger_gains_attempts_and_upstream_request_id_and_takes_old_rows(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    old = sa.MetaData()
    old_usage = sa.Table(
        "usage", old, *(sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                        for c in usage.columns if c.name not in ("attempts", "upstream_request_id")),
    )  # fmt: skip
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(old_usage.insert().values(
            request_id="before", model="m", task="t", provider="local", route="", input_tokens=1, output_tokens=0,
            items=1, compute_s=0.0, cost_usd=0.0, status=200, latency_s=0.1, time=sa.func.current_timestamp(),
        ))  # fmt: skip
    create_usage_table(engine)
    create_usage_table(engine)  # idempotent
    old_row = ("old-shape", None, "m", "t", "local", 1, 2, 1, 0.5, 0.0, 200, 0.01, None, 1.7e9, "/r", None)
    new_row = (*old_row[:4], "mesh-b", *old_row[5:], 3, "up-1")
    new_row = ("new-shape", *new_row[1:])
    done, written, rejected, error = insert_rows(engine, [old_row, new_row])
    assert (done, written, rejected, error) == (2, 2, [], None)
    with engine.connect() as conn:
        rows = {r.request_id: r for r in conn.execute(sa.select(usage))}
    assert (rows["before"].attempts, rows["before"].upstream_request_id) == (1, None)
    assert (rows["old-shape"].attempts, rows["old-shape"].provider) == (1, "local")
    assert (rows["new-shape"].attempts, rows["new-shape"].upstream_request_id, rows["new-shape"].provider) == (
        3, "up-1", "mesh-b",
    )  # fmt: skip


# -- keys ---------------------------------------------------------------------------------------
def test_a_key_limited_to_providers_stores_lists_and_enforces_them(tmp_path):
    store = KeyStore(make_engine(f"sqlite:///{tmp_path / 'keys.db'}"))
    store.init_schema()
    key, _ = store.create("p", ["inference"], providers=["mesh-b", "local", "mesh-b"])
    assert key.providers == ("mesh-b", "local") and key.public()["providers"] == ["mesh-b", "local"]
    (stored,) = [k for k in store.all() if k.id == key.id]
    principal = Principal(stored)
    assert principal.allowed_providers == frozenset({"mesh-b", "local"})
    principal.allow_provider("local")
    with pytest.raises(MeshError) as denied:
        principal.allow_provider("mesh-c")
    assert denied.value.code is ErrorCode.PERMISSION_DENIED and "local, mesh-b" in denied.value.message
    everyone, _ = store.create("all", ["inference"])
    assert Principal(everyone).allowed_providers is None


@pytest.mark.parametrize("bad", ["Mesh-B", "", "-x", "a" * 65, "a b"])
def test_a_key_naming_an_impossible_provider_is_refused(tmp_path, bad):
    store = KeyStore(make_engine(f"sqlite:///{tmp_path / 'keys.db'}"))
    store.init_schema()
    with pytest.raises(MeshError) as refused:
        store.create("p", ["inference"], providers=[bad])
    assert refused.value.code is ErrorCode.INVALID_INPUT and refused.value.param == "providers"


def test_keys_of_an_older_release_gain_providers_and_allow_every_one(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    store = KeyStore(engine)
    store.init_schema()
    key, _ = store.create("old", ["inference"])
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE api_keys DROP COLUMN providers")
    store.init_schema()
    (stored,) = [k for k in store.all() if k.id == key.id]
    assert stored.providers == () and Principal(stored).allowed_providers is None

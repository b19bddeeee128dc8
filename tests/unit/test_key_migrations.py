"""The API-key tables under the gateway database's Alembic migrations (revision 0003), on SQLite and
on a real Postgres (the fixtures of test_ledger.py): an empty database gets them from the migrations
(the key store's start-up creates nothing itself), and a database of the previous release, whose key
store made its tables with create_all while the usage table was at 0002, is adopted: its keys keep
working, their budgets become exact, and new keys are made as before."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from services import cli
from services.gateway.control.keys import KeyStore, api_keys, key_version, token_hash
from services.gateway.db import metadata
from services.gateway.ledger import LedgerSchemaError, migrate
from tests.unit import test_ledger

# test_ledger's databases: a SQLite file, and a database on a real Postgres server.
postgres_server, database_url, engines = test_ledger.postgres_server, test_ledger.database_url, test_ledger.engines


def previous_release_tables(*, with_salt: bool = True) -> sa.MetaData:
    """The key tables as the previous release's key store made them (create_all): budget a float.
    `with_salt=False`: as a release before salted hashes (no secret_salt, no providers)."""
    old = sa.MetaData()
    columns = [
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        *([sa.Column("secret_salt", sa.String(32))] if with_salt else []),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("tasks", sa.JSON, nullable=False),
        *([sa.Column("providers", sa.JSON)] if with_salt else []),
        sa.Column("requests_per_minute", sa.Integer),
        sa.Column("tokens_per_minute", sa.Integer),
        sa.Column("concurrent_requests", sa.Integer),
        sa.Column("budget_usd", sa.Float),
        sa.Column("budget_period", sa.String(8)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    ]
    sa.Table("api_keys", old, *columns)
    sa.Table(
        "key_version",
        old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    return old


def previous_release_database(engine: sa.Engine, *, with_salt: bool = True) -> dict[str, str]:
    """A database as the previous release left it: usage at 0002, key tables from create_all, three
    keys (budgets of $0.30, $1234.5 and none) and the version counter at 7. Returns their tokens."""
    migrate.upgrade(engine, "0002")
    old = previous_release_tables(with_salt=with_salt)
    old.create_all(engine)
    tokens, rows = {}, []
    for key_id, budget in (("k-cheap", 0.3), ("k-big", 1234.5), ("k-free", None)):
        tokens[key_id] = token = f"msk_{key_id}_{secrets.token_urlsafe(32)}"
        salt = secrets.token_hex(16) if with_salt else None
        row = dict(
            id=key_id, name=key_id, scopes=["inference"], models=[], tasks=[], budget_usd=budget,
            budget_period="month" if budget else None, created_at=datetime.now(UTC),
            secret_sha256=token_hash(token, salt) if with_salt else hashlib.sha256(token.encode()).hexdigest(),
        )  # fmt: skip
        rows.append(row | ({"secret_salt": salt, "providers": []} if with_salt else {}))
    with engine.begin() as conn:
        conn.execute(old.tables["api_keys"].insert(), rows)
        conn.execute(old.tables["key_version"].insert().values(id=1, version=7))
    return tokens


def schema_differences(engine: sa.Engine) -> list:
    """What autogenerate finds between the database and the tables the code describes."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)


async def test_an_empty_database_gets_the_key_tables_from_the_migrations(engines, database_url, monkeypatch, capsys):
    engine = engines()
    store = KeyStore(engine)
    store.init_schema()  # what the gateway's start-up does first
    assert migrate.current(engine) == migrate.head() == "0003"
    assert schema_differences(engine) == []  # usage, api_keys, key_version: as the code describes them
    monkeypatch.setenv("MESHSERVE_GATEWAY_DATABASE_URL", database_url)
    assert cli.main(["db", "current"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": 0003 (this release: 0003)")
    key, token = store.create("team", ["inference"], budget_usd=0.1)
    await store.reload()
    assert store.authenticate(token).budget_usd == Decimal("0.1") and key.budget_usd == Decimal("0.1")
    with engine.connect() as conn:
        assert conn.execute(sa.select(key_version.c.version)).scalar_one() == 1


@pytest.mark.parametrize("with_salt", [True, False], ids=["previous-release", "unsalted-release"])
async def test_a_database_of_the_previous_release_is_adopted_and_its_keys_keep_working(
    engines, database_url, monkeypatch, capsys, with_salt
):
    engine = engines()
    tokens = previous_release_database(engine, with_salt=with_salt)
    store = KeyStore(engine)
    if engine.dialect.name == "sqlite":  # one host: upgraded at start-up, after a copy
        store.init_schema()
    else:  # a server database: the operator's step
        with pytest.raises(LedgerSchemaError, match="is at schema revision 0002; this release needs revision 0003"):
            store.init_schema()
        monkeypatch.setenv("MESHSERVE_GATEWAY_DATABASE_URL", database_url)
        assert cli.main(["db", "upgrade"]) == 0
        assert capsys.readouterr().out.rstrip().endswith(": 0002 -> 0003")
        store.init_schema()
    assert migrate.current(engine) == "0003" and schema_differences(engine) == []
    await store.reload()
    keys = {key_id: store.authenticate(token) for key_id, token in tokens.items()}
    assert {key_id: key.budget_usd for key_id, key in keys.items()} == {
        "k-cheap": Decimal("0.3"), "k-big": Decimal("1234.5"), "k-free": None,
    }  # fmt: skip
    assert all(isinstance(key.budget_usd, Decimal) for key in keys.values() if key.budget_usd is not None)
    assert keys["k-cheap"].public()["budget_usd"] == 0.3
    assert store._version_now() == 7  # the counter carried over: replicas of the old view reload
    _, token = store.create("after", ["read"], budget_usd=Decimal("0.000000123"))
    store.revoke("k-free")
    await store.reload()
    assert store.authenticate(token).budget_usd == Decimal("0.000000123") and store._version_now() == 9
    with pytest.raises(Exception, match="revoked"):
        store.authenticate(tokens["k-free"])
    store.init_schema()  # idempotent: at the head, nothing to do
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(api_keys)).scalar_one() == 4


def test_a_pre_release_key_version_counter_is_replaced(engines):
    engine = engines()
    migrate.upgrade(engine, "0002")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE key_version (version INTEGER NOT NULL)"))
        conn.execute(sa.text("INSERT INTO key_version (version) VALUES (3)"))
    migrate.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(key_version.c.id, key_version.c.version)).all() == [(1, 0)]


def test_downgrading_0003_gives_the_previous_release_its_float_budgets_back(engines):
    engine = engines()
    previous_release_database(engine)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        from alembic import command

        command.downgrade(migrate.config(conn), "0002")
    with engine.connect() as conn:
        budgets = dict(conn.execute(sa.text("SELECT id, budget_usd FROM api_keys")).all())
    assert budgets == {"k-cheap": pytest.approx(0.3), "k-big": 1234.5, "k-free": None}


def test_a_budget_stored_above_the_cap_becomes_the_cap(engines):
    """A key stored with a budget larger than any key may have (before the cap existed) counted as
    having the cap; 0003 stores it as the cap, exactly."""
    engine = engines()
    tokens = previous_release_database(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE api_keys SET budget_usd = 1e305 WHERE id = 'k-big'"))
    migrate.upgrade(engine)
    store = KeyStore(engine)
    store.init_schema()
    asyncio.run(store.reload())
    assert store.authenticate(tokens["k-big"]).budget_usd == Decimal(10**9)

"""The usage ledger's Alembic migrations, on SQLite and on a real Postgres (the fixtures of
test_ledger.py): an empty database is brought to the head at start-up, an older one refuses to
start until `meshserve db upgrade`, and upgrading from revision 0001 keeps every row and its cost."""

from __future__ import annotations

import importlib.util
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from services import cli
from services.gateway import db
from services.gateway.ledger import LedgerSchemaError, UsageLedger, migrate, usage
from tests.unit import test_ledger
from tests.unit.test_ledger import rec

# test_ledger's databases: a SQLite file, and a database on a real Postgres server.
postgres_server, database_url, engines = test_ledger.postgres_server, test_ledger.database_url, test_ledger.engines

DAY = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def revision_0001():
    """The migration module of revision 0001 (its frozen columns: the table of older releases)."""
    path = next((migrate.MIGRATIONS / "versions").glob("0001_*.py"))
    spec = importlib.util.spec_from_file_location("ledger_revision_0001", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_rows() -> list[dict]:
    """Rows as revision 0001 holds them: float costs, a request id written twice (the writer that
    died after its commit), an empty one."""
    costs = [0.1, 0.2, 0.1 + 0.2, 1e-9, 0.25, 0.25]
    ids = ["req-0", "req-1", "req-2", "req-3", "req-4", "req-4"]
    ids[3] = ""
    return [
        dict(
            request_id=rid, key_id="key-a", model="m", task="t", provider="local", route="/v1/embeddings",
            input_tokens=10, output_tokens=0, items=1, compute_s=0.5, cost_usd=cost, status=200,
            latency_s=0.01, trace_id=None, time=DAY.replace(tzinfo=None), attempts=1,
        )
        for rid, cost in zip(ids, costs, strict=True)
    ]  # fmt: skip


def old_table() -> sa.Table:
    return sa.Table("usage", sa.MetaData(), *revision_0001()._columns())


def test_upgrade_from_revision_1_with_rows_keeps_the_rows_and_their_costs(engines):
    engine = engines()
    assert migrate.upgrade(engine, "0001") == (None, "0001")
    with engine.begin() as conn:
        conn.execute(old_table().insert(), old_rows())
    assert migrate.upgrade(engine) == ("0001", migrate.head())
    with engine.connect() as conn:
        rows = conn.execute(sa.select(usage.c.id, usage.c.request_id, usage.c.cost_usd).order_by(usage.c.id)).all()
    ids = [rid for _, rid, _ in rows]
    assert ids[:3] == ["req-0", "req-1", "req-2"] and ids[4] == "req-4"  # unique ids kept
    assert ids[3] == f"legacy~{rows[3][0]}" and ids[5] == f"req-4~dup{rows[5][0]}"  # generated, unique
    assert [cost for _, _, cost in rows] == [Decimal(c) for c in ("0.1", "0.2", "0.3", "0.000000001", "0.25", "0.25")]
    assert migrate.ensure_schema(engine) == migrate.head()


async def test_the_upgraded_ledger_takes_new_rows_once_each(engines):
    engine = engines()
    migrate.upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(old_table().insert(), old_rows())
    migrate.upgrade(engine)
    ledger = UsageLedger(engine, flush_interval_s=3600)
    await ledger.start()
    for i in (0, 7, 7):  # req-0 is in the table already
        ledger.record(rec(i, time=DAY, cost_usd=Decimal("0.5")))
    await ledger.flush()
    assert await ledger.count() == 7
    [total] = await ledger.totals(by="day")
    assert Decimal(str(total["cost_usd"])) == Decimal("1.6000000010")  # 0.1+0.2+0.3+1e-9+0.25+0.25 + 0.5
    await ledger.close()


async def test_an_empty_database_is_brought_to_the_head_when_the_gateway_starts(engines):
    engine = engines()
    assert migrate.current(engine) is None
    ledger = UsageLedger(engine, flush_interval_s=3600)
    await ledger.start()
    await ledger.close()
    assert migrate.current(engine) == migrate.head()
    with engine.connect() as conn:  # the table the migrations made is the one schema.py describes
        diffs = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}),
            usage.metadata,
        )
    assert [diff for diff in diffs if _about_usage(diff)] == []


def _about_usage(diff) -> bool:
    """Whether an autogenerate difference concerns the usage table (the shared metadata also holds
    the key store's tables when control.keys is imported: test_key_migrations compares those)."""
    flat = diff if isinstance(diff, tuple) else diff[0]
    return any(getattr(part, "name", None) == "usage" or getattr(part, "table", None) is usage for part in flat) or (
        len(flat) > 2 and flat[2] == "usage"
    )


def test_replicas_starting_together_on_an_empty_database_upgrade_it_once(engines):
    results, errors = [], []

    def start(engine: sa.Engine) -> None:
        try:
            results.append(migrate.ensure_schema(engine))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(engines(),)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == [] and results == [migrate.head()] * 3


async def test_a_ledger_of_a_release_before_migrations_refuses_to_start_until_db_upgrade(
    engines,
    database_url,
    monkeypatch,
    capsys,
):
    engine = engines()
    table = old_table()
    for name in ("route", "attempts", "upstream_request_id"):  # an even older release's table lacks these
        table._columns.remove(table.c[name])
    table.create(engine)  # as those releases did: no revision
    with engine.begin() as conn:
        conn.execute(table.insert(), [{k: v for k, v in row.items() if k in table.c} for row in old_rows()])
    ledger = UsageLedger(engine, flush_interval_s=3600, auto_upgrade=False)
    with pytest.raises(LedgerSchemaError, match=r"before schema migrations; .* run `meshserve db upgrade`"):
        await ledger.start()
    monkeypatch.setenv("MESHSERVE_GATEWAY_DATABASE_URL", database_url)
    assert cli.main(["db", "current"]) == 0
    assert "(none) (this release: 0003)" in capsys.readouterr().out
    assert cli.main(["db", "upgrade"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": (none) -> 0003")
    assert cli.main(["db", "upgrade"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": at 0003 already")
    await ledger.start()  # now it starts
    rows = await ledger.query(limit=100)
    assert len(rows) == 6 and {row["route"] for row in rows} == {""} and {row["attempts"] for row in rows} == {1}
    await ledger.close()


async def test_an_older_or_unknown_revision_refuses_to_start(engines):
    engine = engines()
    migrate.upgrade(engine, "0001")
    with pytest.raises(LedgerSchemaError, match="is at schema revision 0001; this release needs revision 0003"):
        await UsageLedger(engine, auto_upgrade=False).start()
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(LedgerSchemaError, match="0099, which this release does not know"):
        await UsageLedger(engine).start()


async def test_by_default_a_sqlite_ledger_is_upgraded_after_a_copy_and_a_server_one_refuses(engines, database_url):
    """`meshserve up` and the tests on one host share a SQLite file: an older one is upgraded at
    start-up, its copy from before kept beside it. A server database is the operator's to upgrade."""
    engine = engines()
    migrate.upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(old_table().insert(), old_rows())
    ledger = UsageLedger(engine, flush_interval_s=3600)
    if engine.dialect.name != "sqlite":
        with pytest.raises(LedgerSchemaError, match="back it up, then run `meshserve db upgrade`"):
            await ledger.start()
        return
    await ledger.start()
    assert migrate.current(engine) == migrate.head() and await ledger.count() == 6
    await ledger.close()
    copy = db.default_url(Path(engine.url.database).parent).rsplit("/", 1)[1] + ".before-0003"
    before = db.make_engine(f"sqlite:///{Path(engine.url.database).parent / copy}")
    assert migrate.current(before) == "0001"
    with before.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*), sum(cost_usd) FROM usage")).one() == (6, pytest.approx(1.1))
    assert (Path(engine.url.database).parent / copy).stat().st_mode & 0o077 == 0
    before.dispose()


def test_migrations_ship_in_the_package():
    """env.py and every revision are files of the installed package (a package each, so that
    `pip install .` carries them), and the chain is one line from 0001 to the head."""
    assert (migrate.MIGRATIONS / "__init__.py").is_file() and (
        migrate.MIGRATIONS / "versions" / "__init__.py"
    ).is_file()
    assert migrate.revisions() == ["0003", "0002", "0001"]


def test_db_current_on_the_default_database(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MESHSERVE_GATEWAY_DATABASE_URL", raising=False)
    monkeypatch.setenv("MESHSERVE_HOME", str(tmp_path))
    assert cli.main(["db", "upgrade"]) == 0
    assert str(tmp_path / "gateway.db") in capsys.readouterr().out
    assert migrate.current(db.make_engine(db.default_url(tmp_path))) == "0003"

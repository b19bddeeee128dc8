"""The ledger as money, on SQLite and on a real Postgres (the fixtures of test_ledger.py): costs are
exact decimals from the row to the reports, and one request is one row: a batch written again
(a writer that died after its commit, before the gateway read its acknowledgement) bills nothing
twice."""

from __future__ import annotations

import logging
import os
import signal
from decimal import Decimal

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from services.gateway.ledger import LedgerWriteError, UsageLedger, migrate, usage
from services.gateway.ledger.schema import row_values, usd
from services.gateway.ledger.writer import insert_rows
from tests.unit import test_ledger
from tests.unit.test_ledger import rec

# test_ledger's databases: a SQLite file, and a database on a real Postgres server.
postgres_server, database_url, engines = test_ledger.postgres_server, test_ledger.database_url, test_ledger.engines

COSTS = [0.1, 0.2, 1e-9, Decimal("12345.123456789"), 0.1 + 0.2, 7.0000000004]  # the last: rounds to 7
EXACT = [Decimal(text) for text in ("0.1", "0.2", "0.000000001", "12345.123456789", "0.3", "7")]


def rows_written() -> float:
    return REGISTRY.get_sample_value("meshserve_gateway_ledger_rows_written_total") or 0.0


def ledger_costs(engine: sa.Engine) -> dict[str, Decimal]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(usage.c.request_id, usage.c.cost_usd)).all())


def test_usd_rounds_to_the_nano_dollar_and_refuses_what_is_no_amount():
    assert [usd(cost) for cost in COSTS] == EXACT
    assert str(usd(0.1)) == "0.100000000" and usd("2.5000000005") == Decimal("2.500000000")  # half even
    for bad in (float("nan"), float("inf"), "ten dollars"):
        with pytest.raises(ValueError):
            usd(bad)


async def test_costs_are_exact_from_the_row_to_the_reports(engines):
    engine = engines()
    ledger = UsageLedger(engine, flush_interval_s=3600)
    await ledger.start()
    for i, cost in enumerate(COSTS):
        ledger.record(rec(i, cost_usd=cost))
    await ledger.flush()
    stored = ledger_costs(engine)
    assert stored == {f"req-{i}": exact for i, exact in enumerate(EXACT)}
    assert all(isinstance(cost, Decimal) for cost in stored.values())
    [total] = await ledger.totals(by="day")
    assert isinstance(total["cost_usd"], float)  # the report's shape: a JSON number, as before
    assert Decimal(str(total["cost_usd"])) == sum(EXACT) == Decimal("12352.723456790")  # summed exactly
    listed = {row["request_id"]: row["cost_usd"] for row in await ledger.query(limit=100)}
    assert {rid: Decimal(str(cost)) for rid, cost in listed.items()} == stored
    await ledger.close()


def test_a_batch_written_again_is_done_but_not_written(engines):
    """The writer's insert is idempotent by request id: in one batch, in a replay, and in the
    row-by-row fallback that follows a row the database refuses."""
    engine = engines()
    migrate.ensure_schema(engine)
    batch = [row_values(rec(i)) for i in range(5)]
    assert insert_rows(engine, batch) == (5, 5, [], None)
    assert insert_rows(engine, batch) == (5, 0, [], None)  # the replay: every row done, none written
    assert insert_rows(engine, [row_values(rec(9)), row_values(rec(9))]) == (2, 1, [], None)
    mixed = [row_values(rec(1)), row_values(rec(20, model=None)), row_values(rec(21))]
    done, written, rejected, error = insert_rows(engine, mixed)  # the bad row: one by one
    assert (done, written, [rid for rid, _ in rejected], error) == (3, 1, ["req-20"], None)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(usage)).scalar() == 7


async def test_a_writer_that_dies_after_its_commit_does_not_bill_twice(engines, caplog):
    """The writer process commits the batch, then dies before the gateway has its acknowledgement:
    the gateway keeps the rows, starts a new writer and sends them again. One row per request, one
    charge each."""
    engine = engines()
    ledger = UsageLedger(engine, flush_interval_s=3600)
    await ledger.start()
    process = ledger._writer_process
    real_write = process.write

    async def commit_then_die(rows, timeout_s=None):
        await real_write(rows, timeout_s)  # committed (the real writer process wrote it) ...
        os.kill(process.pid, signal.SIGKILL)  # ... and the acknowledgement is lost with the process
        process._discard()
        raise LedgerWriteError("the writer process is gone (exit code -9)")

    for i in range(50):
        ledger.record(rec(i, cost_usd=Decimal("0.000123456")))
    written_before = rows_written()
    process.write = commit_then_die
    with pytest.raises(LedgerWriteError):
        await ledger.flush()
    process.write = real_write
    assert len(ledger._queue) == 50 and await ledger.count() == 50  # queued still, and in the table
    with caplog.at_level(logging.WARNING, logger="services.gateway.ledger.queue"):
        await ledger.flush()  # a new writer process: the replay
    assert ledger._queue == []
    assert rows_written() == written_before  # the replay wrote nothing new
    assert "50 usage rows were in the ledger already" in caplog.text
    assert await ledger.count() == 50
    assert len({row["request_id"] for row in await ledger.query(limit=100)}) == 50
    [total] = await ledger.totals(by="day")
    assert Decimal(str(total["cost_usd"])) == 50 * Decimal("0.000123456")  # one charge per request
    await ledger.close()

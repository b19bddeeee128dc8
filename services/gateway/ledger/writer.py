"""The usage ledger's writer process (`python -m services.gateway.ledger.writer`, started by the
gateway through `pipe.WriterProcess`): it receives batches of usage rows on its stdin, inserts each
batch in one transaction, and acknowledges the batch on its stdout once it is committed. A process
and not a thread, so that the insert's Python work never holds the gateway's GIL (bench/README.md,
"Usage ledger: profiling notes").

A row leaves the gateway's queue only when this process has acknowledged its commit, so a failed
write, a crash of this process, or a gateway stopped by SIGTERM lose nothing (the gateway keeps the
rows, starts a new writer and retries). A writer that dies after a commit but before its
acknowledgement does not make the retry bill twice: every insert is INSERT ... ON CONFLICT
(request_id) DO NOTHING, so rows already committed are skipped (acknowledged as done, not written).

The writer exits when its stdin closes: when the gateway closes the ledger, or when the gateway
dies. It ignores SIGINT and SIGTERM, which reach it with the gateway's process group: stopping is
the gateway's decision, taken after it has sent everything (the SIGTERM drain).
"""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from services.common.logs import setup_logging
from services.gateway.db import make_engine
from services.gateway.ledger.pipe import UP, Acknowledgement, frame, read_frame
from services.gateway.ledger.schema import COST, FIELDS, REQUEST_ID, TIME, as_utc, nanos, normalized_row, usage

# Errors that no retry can fix: the row itself is wrong (a NOT NULL column is None, a value too large).
_BAD_ROW_ERRORS = (sa.exc.IntegrityError, sa.exc.DataError)
# SQLite rows: every field but the time as it is, then the time as text (the column order is free).
_SQLITE_COLUMNS = (*(name for name in FIELDS if name != "time"), "time")
assert COST < TIME  # (_sqlite_values)
# Bound variables per statement: 32766 since SQLite 3.32, 999 before (one per field of a row).
_SQLITE_ROWS_PER_INSERT = min(1000, (32766 if sqlite3.sqlite_version_info >= (3, 32) else 999) // len(FIELDS))


def insert_rows(engine: sa.Engine, rows: Sequence[tuple]) -> Acknowledgement:
    """Insert rows (as UsageLedger.append() takes them), in one transaction if it can: (rows done
    from the front of the batch, rows written, rejected rows, error). A row whose request id is in
    the table already is done but not written (a batch retried after a lost acknowledgement).

    When the database rejects the batch as invalid, the rows are written one by one, so one bad row
    cannot hold back the others forever: the bad ones come back as (request_id, reason) and are
    dropped. A failure of another kind stops there: rows written before it count as done, the rest
    are not done (error says why), so a retry writes nothing twice. A failure of the one
    transaction raises: nothing is done."""
    rejected: list[tuple[str, str]] = []
    normalized: list[tuple | None] = []
    for row in rows:
        try:
            normalized.append(normalized_row(row))
        except (TypeError, ValueError, OverflowError, IndexError) as exc:  # a malformed row: no retry helps
            rejected.append((str(row[REQUEST_ID]) if row else "?", f"{type(exc).__name__}: {exc}"))
            normalized.append(None)
    good = [row for row in normalized if row is not None]
    try:
        return len(rows), _insert_batch(engine, good), rejected, None
    except _BAD_ROW_ERRORS:
        pass
    written = 0
    for done, row in enumerate(normalized):
        if row is None:
            continue
        try:
            with engine.begin() as conn:
                inserted = conn.execute(idempotent_insert(conn.dialect.name), dict(zip(FIELDS, row, strict=True))).all()
            written += len(inserted)
        except _BAD_ROW_ERRORS as exc:
            rejected.append((row[REQUEST_ID], str(exc).splitlines()[0]))
        except Exception as exc:  # e.g. the database went away: what is written stays written
            return done, written, rejected, f"{type(exc).__name__}: {exc}"
    return len(rows), written, rejected, None


def idempotent_insert(dialect: str) -> sa.Insert:
    """INSERT of one usage row, or of many (executemany), that skips a row whose request id is in
    the table already and returns the request id of each row it inserted (rowcount is not reliable
    for that on every driver). (Another dialect gets a plain INSERT: the unique index then refuses
    the duplicate, which is rejected and dropped, so it is not billed twice either.)"""
    if dialect == "postgresql":
        stmt = postgresql.insert(usage).on_conflict_do_nothing(index_elements=["request_id"])
    elif dialect == "sqlite":
        stmt = sqlite.insert(usage).on_conflict_do_nothing(index_elements=["request_id"])
    else:
        stmt = usage.insert()
    return stmt.returning(usage.c.request_id)


def _insert_batch(engine: sa.Engine, rows: list[tuple]) -> int:
    """Insert normalized rows in one transaction: how many were new. SQLite gets multi-row INSERTs
    of plain values through the driver (the stored values are the ones SQLAlchemy writes and reads
    back); Postgres an executemany that returns the request id of each row it inserted."""
    written = 0
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            for start in range(0, len(rows), _SQLITE_ROWS_PER_INSERT):
                chunk = rows[start : start + _SQLITE_ROWS_PER_INSERT]
                written += conn.exec_driver_sql(_sqlite_insert(len(chunk)), tuple(_sqlite_values(chunk))).rowcount
        elif rows:
            inserted = conn.execute(
                idempotent_insert(conn.dialect.name),
                [dict(zip(FIELDS, row, strict=True)) for row in rows],
            )
            written = len(inserted.all())
    return written


@functools.lru_cache(maxsize=8)
def _sqlite_insert(rows: int) -> str:
    """`idempotent_insert("sqlite")` as text, for `rows` rows of plain values."""
    one = f"({', '.join('?' * len(_SQLITE_COLUMNS))})"
    return (
        f"INSERT INTO usage ({', '.join(_SQLITE_COLUMNS)}) VALUES {', '.join([one] * rows)} "
        "ON CONFLICT (request_id) DO NOTHING"
    )


def _sqlite_values(rows: Sequence[tuple]) -> list:
    """Every row's values in _SQLITE_COLUMNS order as `Money` and `UTCDateTime` store them on
    SQLite: the cost in nano-dollars, the time as naive UTC text."""
    values: list = []
    for row in rows:
        values.extend(row[:COST])
        values.append(nanos(row[COST]))
        values.extend(row[COST + 1 : TIME])
        values.extend(row[TIME + 1 :])
        values.append(as_utc(row[TIME]).replace(tzinfo=None).isoformat(" ", "microseconds"))
    return values


def main() -> int:
    """Serve the gateway's pipe until it closes."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    protocol_out = os.fdopen(os.dup(1), "wb")  # the protocol keeps stdout; fd 1 now goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    setup_logging("gateway", os.environ.get("MESHSERVE_LOG_LEVEL", "INFO"))
    stdin, stdout = sys.stdin.buffer, protocol_out
    config = read_frame(stdin)
    if config is None:
        return 0
    # Below the gateway: woken by its pipe, the writer would otherwise often run on (and preempt)
    # the gateway's core.
    os.nice(config["nice"])
    engine = make_engine(config["url"])
    stdout.write(frame(UP))
    stdout.flush()
    try:
        while (message := read_frame(stdin)) is not None:
            seq, rows = message
            try:
                ack = (seq, *insert_rows(engine, rows))
            except Exception as exc:  # nothing written: the gateway keeps the rows, retries, logs it
                ack = (seq, 0, 0, [], f"{type(exc).__name__}: {exc}")
            stdout.write(frame(ack))
            stdout.flush()
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())

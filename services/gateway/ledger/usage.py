"""The usage ledger: one row per request the gateway answered (who, which model, tokens, compute,
cost, status), written in batches off the request path and read back as listings and totals.

`record()` only appends to an in-memory queue, so metering never adds database latency to a
request; a background task sends the queue in batches to the ledger's writer process
(`ledger_writer.py`: off the gateway's GIL), which inserts each batch in one transaction and
acknowledges its commit. Rows leave the queue only then: a failed write keeps its rows and is
retried with backoff, because every row is money. Rows are lost only if the gateway process dies,
or if `close()` runs out of its bounded time (and then it says how many). Several gateway replicas
may share one database (Postgres, or one SQLite file).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import operator
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import sqlalchemy as sa
from prometheus_client import Counter, Gauge, Histogram

from services.gateway.db import add_missing_columns, create_tables, metadata
from services.gateway.ledger.writer import LedgerWriteError, WriterProcess

log = logging.getLogger(__name__)

ROWS_WRITTEN = Counter("meshserve_gateway_ledger_rows_written_total", "Usage rows written to the database.")
QUEUE_ROWS = Gauge("meshserve_gateway_ledger_queue_rows", "Usage rows recorded but not yet written.")
WRITE_SECONDS = Histogram(
    "meshserve_gateway_ledger_write_seconds", "Time of one batched usage insert, sent until its commit is acknowledged."
)
WRITE_FAILURES = Counter("meshserve_gateway_ledger_write_failures_total", "Batched usage inserts that failed.")

_MAX_BACKOFF_S = 5.0
WRITE_TIMEOUT_S = 60.0  # one batch, sent until acknowledged: a hung database is given up on (and retried)
# Errors that no retry can fix: the row itself is wrong (a NOT NULL column is None, a value too large).
_BAD_ROW_ERRORS = (sa.exc.IntegrityError, sa.exc.DataError)


class UTCDateTime(sa.TypeDecorator):
    """A timezone-aware UTC datetime on every dialect: Postgres keeps `timestamptz`; SQLite has no
    time zones, so values are stored as naive UTC (a fixed-width text that sorts and compares in time
    order) and come back aware."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def as_utc(value: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


usage = sa.Table(
    "usage",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("key_id", sa.String(128), nullable=True, comment="API key id (never the token); NULL: auth off"),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("provider", sa.String(64), nullable=False),
    sa.Column("route", sa.String(256), nullable=False, server_default=""),
    sa.Column("input_tokens", sa.Integer, nullable=False),
    sa.Column("output_tokens", sa.Integer, nullable=False),
    sa.Column("items", sa.Integer, nullable=False),
    sa.Column("compute_s", sa.Float, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("status", sa.Integer, nullable=False, comment="HTTP status the caller got"),
    sa.Column("latency_s", sa.Float, nullable=False),
    sa.Column("trace_id", sa.String(32), nullable=True),
    sa.Column("time", UTCDateTime, nullable=False, comment="when the request started (UTC)"),
    sa.Column(
        "client_request_id",
        sa.String(128),
        nullable=True,
        comment="the caller's X-Request-Id (not unique, not trusted)",
    ),
    sa.Index("ix_usage_key_id_time", "key_id", "time"),
    sa.Index("ix_usage_time", "time"),
)


@dataclass(slots=True)
class UsageRecord:
    """What one request cost. Built by the gateway after it answered, success or error."""

    request_id: str
    key_id: str | None  # API key id (never the token), None when auth is off
    model: str
    task: str  # e.g. "feature-extraction", "text-classification", "embeddings"
    provider: str  # "local" for the mesh
    input_tokens: int
    output_tokens: int
    items: int
    compute_s: float  # inference time attributed to this request
    cost_usd: float
    status: int  # HTTP status (or the HTTP status of the gRPC error) the caller got
    latency_s: float
    trace_id: str | None
    time: datetime  # UTC, timezone-aware; when the request started
    route: str = ""  # e.g. "/v1/embeddings", "grpc:Predict"
    client_request_id: str | None = None  # the id the caller sent, as it sent it (request_id is the gateway's)


Grouping = Literal["day", "model", "key"]
_INT_SUMS = ("input_tokens", "output_tokens", "items")
_FLOAT_SUMS = ("compute_s", "cost_usd")


class UsageLedger:
    """Batched writer and reader of the `usage` table; one per gateway process.

    `flush_interval_s` bounds how stale the table is; `max_batch` bounds one INSERT (a longer queue
    wakes the writer early and is written in several batches); `close_timeout_s` bounds how long
    `close()` keeps retrying a failing database before it gives up on the rows still queued;
    `writer_nice`: the writer process' CPU priority below the gateway's.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        flush_interval_s: float = 0.2,
        max_batch: int = 1000,
        close_timeout_s: float = 10.0,
        writer_nice: int = 10,
    ) -> None:
        self._engine = engine
        self._writer_process = WriterProcess(engine.url.render_as_string(hide_password=False), nice=writer_nice)
        self._flush_interval_s = flush_interval_s
        self._max_batch = max_batch
        self._close_timeout_s = close_timeout_s
        self._queue: list[tuple] = []  # rows as append() takes them
        self._gauged = 0  # rows of the queue counted in QUEUE_ROWS (append() leaves the gauge alone)
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._writer: asyncio.Task | None = None
        self._closing = False  # close() began: the writer stops, close() itself drains
        self._closed = False  # close() ended: nothing will write a new row any more

    # --- writing -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the tables if needed and start the writer process and the task that feeds it."""
        if self._engine.url.get_backend_name() == "sqlite" and self._engine.url.database in (None, "", ":memory:"):
            raise ValueError("the usage ledger needs a database file or server: an in-memory SQLite is per connection")
        await asyncio.to_thread(create_usage_table, self._engine)
        await self._writer_process.start()
        self._writer = asyncio.create_task(self._run_writer(), name="usage-ledger-writer")

    def record(self, rec: UsageRecord) -> None:
        """Queue one row for the writer. No I/O and nothing that can fail: safe on the request path."""
        self.append(_values(rec))

    def append(self, row: tuple) -> None:
        """`record()` for a row already in tuple form (UsageRecord's fields in order; `trace_id`
        may be the int and `time` unix seconds: the writer process formats them). What metering
        uses: no object built per request."""
        if self._closed:
            log.error("usage ledger is closed; dropped the usage row of request %s", row[_REQUEST_ID])
            return
        self._queue.append(row)
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    async def flush(self) -> None:
        """Write every row queued before this call. A failed write raises (the rows stay queued and
        the writer keeps retrying them)."""
        target = len(self._queue)
        while target > 0:
            target -= await self._write_batch(min(target, self._max_batch))

    async def close(self) -> None:
        """Stop the writer once everything queued is written (the SIGTERM drain). Retries a failing
        database with backoff for `close_timeout_s`, then logs how many rows it could not write.
        (One attempt may itself last up to the database's busy or connect timeout.)"""
        self._closing = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout_s
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._writer  # a write hung past the deadline is cancelled: its rows stay queued
            self._writer = None
        delay = self._flush_interval_s
        while self._queue and loop.time() < deadline:
            try:
                async with asyncio.timeout_at(deadline):
                    await self.flush()
            except Exception:
                if loop.time() + delay > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)
        if self._queue:
            log.error("usage ledger closed with %d rows it could not write; they are lost", len(self._queue))
            self._queue.clear()
        self._gauge()
        self._closed = True
        await self._writer_process.close()

    async def _run_writer(self) -> None:
        """Write the queue every flush interval (sooner when it is long); back off while writes fail."""
        delay = self._flush_interval_s
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._wake.clear()
            self._gauge()
            try:
                await self.flush()
                delay = self._flush_interval_s
            except Exception as exc:
                delay = min(max(delay, self._flush_interval_s) * 2, _MAX_BACKOFF_S)
                log.warning(
                    "usage ledger write failed (%s); %d rows kept, retrying in %.1f s",
                    type(exc).__name__,
                    len(self._queue),
                    delay,
                )

    def _gauge(self) -> None:
        """Bring QUEUE_ROWS up to date with this ledger's queue (each ledger adds its own share)."""
        QUEUE_ROWS.inc(len(self._queue) - self._gauged)
        self._gauged = len(self._queue)

    async def _write_batch(self, size: int) -> int:
        """Write the oldest `size` queued rows in one transaction; they leave the queue only once
        the writer process acknowledged their commit, so a failure loses nothing. Returns the rows
        consumed. (A write cancelled or timed out kills the writer process and leaves its rows
        queued: a commit that landed just before is written twice, the one duplicate case.)"""
        async with self._write_lock:
            batch = self._queue[:size]
            if not batch:
                return size
            with WRITE_SECONDS.time():
                try:
                    done, written, rejected, error = await self._writer_process.write(batch, WRITE_TIMEOUT_S)
                except BaseException:
                    WRITE_FAILURES.inc()
                    raise
            for request_id, reason in rejected:
                log.error("usage row of request %s rejected by the database, dropped: %s", request_id, reason)
            ROWS_WRITTEN.inc(written)
            del self._queue[:done]
            self._gauge()
            if error is not None:  # the rows after `done` were not written: they stay queued
                WRITE_FAILURES.inc()
                raise LedgerWriteError(error)
            return done

    # --- reading -------------------------------------------------------------------------------

    async def query(
        self,
        *,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict]:
        """Rows newest first, as dicts of the table's columns (`time` aware UTC). `since` is
        inclusive, `until` exclusive."""
        stmt = (
            sa.select(usage)
            .where(*_filters(key_id, model, since, until))
            .order_by(usage.c.time.desc(), usage.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return [{str(k): v for k, v in row.items()} for row in await self._read(stmt)]  # plain str keys (orjson)

    async def totals(
        self,
        *,
        by: Grouping,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[dict]:
        """One row per day (UTC, "YYYY-MM-DD"), model or key, in that order: its `requests` and the
        sums of tokens, items, compute and cost."""
        group, name = self._group_column(by)
        stmt = (
            sa.select(group.label(name), sa.func.count().label("requests"), *_sum_columns())
            .where(*_filters(key_id, model, since, until))
            .group_by(group)
            .order_by(group)
        )
        return [_totals_row(row, name) for row in await self._read(stmt)]

    async def count(
        self,
        *,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """How many rows match the filters (as in `query`)."""
        stmt = sa.select(sa.func.count().label("rows")).select_from(usage).where(*_filters(key_id, model, since, until))
        return int((await self._read(stmt))[0]["rows"])

    def _group_column(self, by: Grouping) -> tuple[sa.ColumnElement, str]:
        if by == "model":
            return usage.c.model, "model"
        if by == "key":
            return usage.c.key_id, "key_id"
        if by == "day":
            return self._utc_day(), "day"
        raise ValueError(f"totals by {by!r}: expected day, model or key")

    def _utc_day(self) -> sa.ColumnElement:
        """The UTC calendar day of a row. SQLite stores naive UTC text (date() reads it); Postgres
        truncates in the session's time zone unless told UTC."""
        if self._engine.dialect.name == "sqlite":
            return sa.func.date(usage.c.time)
        return sa.cast(sa.func.timezone("UTC", usage.c.time), sa.Date)

    async def _read(self, stmt: sa.Select) -> list[sa.RowMapping]:
        return await asyncio.to_thread(self._execute, stmt)

    def _execute(self, stmt: sa.Select) -> list[sa.RowMapping]:
        with self._engine.connect() as conn:
            return list(conn.execute(stmt).mappings())


def create_usage_table(engine: sa.Engine) -> None:
    """Create the tables, and add the columns a ledger of an older release lacks (idempotent)."""
    create_tables(engine)
    add_missing_columns(engine, usage)


_FIELDS = tuple(field.name for field in dataclasses.fields(UsageRecord))
_values = operator.attrgetter(*_FIELDS)  # a record as the tuple the writer process receives
_TIME = _FIELDS.index("time")
_REQUEST_ID = _FIELDS.index("request_id")
# SQLite rows: every field but the time as it is, then the time as text (the column order is free).
_SQLITE_COLUMNS = (*(name for name in _FIELDS if name != "time"), "time")
# Bound variables per statement: 32766 since SQLite 3.32, 999 before (16 per row).
_SQLITE_ROWS_PER_INSERT = 1000 if sqlite3.sqlite_version_info >= (3, 32) else 60


def insert_rows(engine: sa.Engine, rows: Sequence[tuple]) -> tuple[int, int, list[tuple[str, str]], str | None]:
    """Insert rows (as UsageLedger.append() takes them), in one transaction if it can: (rows done
    from the front of the batch, rows written, rejected rows, error). Runs in the writer process.

    When the database rejects the batch as invalid, the rows are written one by one, so one bad row
    cannot hold back the others forever: the bad ones come back as (request_id, reason) and are
    dropped. A failure of another kind stops there: rows written before it count as done, the rest
    are not done (error says why), so a retry writes nothing twice. A failure of the one
    transaction raises: nothing is done.

    SQLite gets multi-row INSERTs of plain values through the driver: SQLAlchemy's executemany
    processed parameters at 14 µs a row against 5 (the stored text is the one SQLAlchemy writes
    and reads back)."""
    rejected: list[tuple[str, str]] = []
    normalized: list[tuple | None] = []
    for row in rows:
        try:
            normalized.append(_normalized(row))
        except (TypeError, ValueError, OverflowError, IndexError) as exc:  # a malformed row: no retry helps
            rejected.append((str(row[_REQUEST_ID]) if row else "?", f"{type(exc).__name__}: {exc}"))
            normalized.append(None)
    good = [row for row in normalized if row is not None]
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                for start in range(0, len(good), _SQLITE_ROWS_PER_INSERT):
                    chunk = good[start : start + _SQLITE_ROWS_PER_INSERT]
                    conn.exec_driver_sql(_sqlite_insert(len(chunk)), tuple(_sqlite_values(chunk)))
            elif good:
                conn.execute(usage.insert(), [dict(zip(_FIELDS, row, strict=True)) for row in good])
        return len(rows), len(good), rejected, None
    except _BAD_ROW_ERRORS:
        pass
    written = 0
    for done, row in enumerate(normalized):
        if row is None:
            continue
        try:
            with engine.begin() as conn:
                conn.execute(usage.insert(), dict(zip(_FIELDS, row, strict=True)))
            written += 1
        except _BAD_ROW_ERRORS as exc:
            rejected.append((row[_REQUEST_ID], str(exc).splitlines()[0]))
        except Exception as exc:  # e.g. the database went away: what is written stays written
            return done, written, rejected, f"{type(exc).__name__}: {exc}"
    return len(rows), written, rejected, None


_TRACE_ID = _FIELDS.index("trace_id")
_ROUNDED = tuple(_FIELDS.index(name) for name in ("compute_s", "latency_s"))


def _normalized(row: tuple) -> tuple:
    """A row as the table stores it: the trace id as 32 hex digits, the time an aware UTC datetime,
    seconds rounded to the microsecond."""
    values = list(row)
    if isinstance(values[_TRACE_ID], int):
        values[_TRACE_ID] = format(values[_TRACE_ID], "032x")
    if isinstance(values[_TIME], int | float):
        values[_TIME] = datetime.fromtimestamp(values[_TIME], UTC)
    for index in _ROUNDED:
        values[index] = round(values[index], 6)
    return tuple(values)


@functools.lru_cache(maxsize=8)
def _sqlite_insert(rows: int) -> str:
    one = f"({', '.join('?' * len(_SQLITE_COLUMNS))})"
    return f"INSERT INTO usage ({', '.join(_SQLITE_COLUMNS)}) VALUES {', '.join([one] * rows)}"


def _sqlite_values(rows: Sequence[tuple]) -> list:
    """Every row's values in _SQLITE_COLUMNS order, the time as the naive UTC text UTCDateTime stores."""
    values: list = []
    for row in rows:
        values.extend(row[:_TIME])
        values.extend(row[_TIME + 1 :])
        values.append(as_utc(row[_TIME]).replace(tzinfo=None).isoformat(" ", "microseconds"))
    return values


def _filters(
    key_id: str | None, model: str | None, since: datetime | None, until: datetime | None
) -> list[sa.ColumnElement[bool]]:
    clauses = []
    if key_id is not None:
        clauses.append(usage.c.key_id == key_id)
    if model is not None:
        clauses.append(usage.c.model == model)
    if since is not None:
        clauses.append(usage.c.time >= as_utc(since))
    if until is not None:
        clauses.append(usage.c.time < as_utc(until))
    return clauses


def _sum_columns() -> list[sa.Label]:
    return [sa.func.coalesce(sa.func.sum(usage.c[name]), 0).label(name) for name in _INT_SUMS + _FLOAT_SUMS]


def _totals_row(row: sa.RowMapping, name: str) -> dict:
    """Plain JSON-ready values: Postgres sums integers as numeric and returns dates as `date`."""
    group = row[name]
    return {
        name: group.isoformat() if hasattr(group, "isoformat") else group,
        "requests": int(row["requests"]),
        **{field: int(row[field]) for field in _INT_SUMS},
        **{field: float(row[field]) for field in _FLOAT_SUMS},
    }

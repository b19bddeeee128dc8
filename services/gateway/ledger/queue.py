"""The usage ledger's queue: `UsageLedger` accepts one row per request without blocking and hands
the queue in batches to the writer process, off the request path; it also answers the usage
reports of its database.

`record()` only appends to an in-memory queue, so metering never adds database latency to a
request; a background task sends the queue in batches to the writer process (`writer.py`), which
inserts each batch in one transaction and acknowledges its commit. Rows leave the queue only then:
a failed write keeps its rows and is retried with backoff, because every row is money. Rows are
lost only if the gateway process dies, or if `close()` runs out of its bounded time (and then it
says how many). Several gateway replicas may share one database (Postgres, or one SQLite file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import sqlalchemy as sa
from prometheus_client import Counter, Gauge, Histogram

from services.gateway.ledger.migrate import ensure_schema
from services.gateway.ledger.pipe import LedgerWriteError, WriterProcess
from services.gateway.ledger.reports import Grouping, UsageReports
from services.gateway.ledger.schema import REQUEST_ID, UsageRecord, row_values

log = logging.getLogger(__name__)

ROWS_WRITTEN = Counter("meshserve_gateway_ledger_rows_written_total", "Usage rows written to the database.")
QUEUE_ROWS = Gauge("meshserve_gateway_ledger_queue_rows", "Usage rows recorded but not yet written.")
WRITE_SECONDS = Histogram(
    "meshserve_gateway_ledger_write_seconds", "Time of one batched usage insert, sent until its commit is acknowledged."
)
WRITE_FAILURES = Counter("meshserve_gateway_ledger_write_failures_total", "Batched usage inserts that failed.")

_MAX_BACKOFF_S = 5.0
WRITE_TIMEOUT_S = 60.0  # one batch, sent until acknowledged: a hung database is given up on (and retried)


class UsageLedger:
    """Batched writer and reader of the `usage` table; one per gateway process.

    `flush_interval_s` bounds how stale the table is; `max_batch` bounds one INSERT (a longer queue
    wakes the writer early and is written in several batches); `close_timeout_s` bounds how long
    `close()` keeps retrying a failing database before it gives up on the rows still queued;
    `writer_nice`: the writer process' CPU priority below the gateway's; `auto_upgrade`: whether
    start() upgrades a database at an older schema revision (None: a SQLite file yes, after keeping
    a copy; a server no: LedgerSchemaError, `meshserve db upgrade`; see migrate.py).
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        flush_interval_s: float = 0.2,
        max_batch: int = 1000,
        close_timeout_s: float = 10.0,
        writer_nice: int = 10,
        auto_upgrade: bool | None = None,
    ) -> None:
        self._engine = engine
        self._auto_upgrade = auto_upgrade
        self._writer_process = WriterProcess(engine.url.render_as_string(hide_password=False), nice=writer_nice)
        self.reports = UsageReports(engine)
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
        """Check the database's schema revision (an empty database is brought to the head, an older
        one as `auto_upgrade` says, else LedgerSchemaError: `meshserve db upgrade`), then start the
        writer process and the task that feeds it."""
        if self._engine.url.get_backend_name() == "sqlite" and self._engine.url.database in (None, "", ":memory:"):
            raise ValueError("the usage ledger needs a database file or server: an in-memory SQLite is per connection")
        await asyncio.to_thread(ensure_schema, self._engine, self._auto_upgrade)
        await self._writer_process.start()
        self._writer = asyncio.create_task(self._run_writer(), name="usage-ledger-writer")

    def record(self, rec: UsageRecord) -> None:
        """Queue one row for the writer. No I/O and nothing that can fail: safe on the request path."""
        self.append(row_values(rec))

    def append(self, row: tuple) -> None:
        """`record()` for a row already in tuple form (UsageRecord's fields in order; `trace_id`
        may be the int and `time` unix seconds: the writer process formats them). What metering
        uses: no object built per request."""
        if self._closed:
            log.error("usage ledger is closed; dropped the usage row of request %s", row[REQUEST_ID])
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
        await self._drain(deadline)
        if self._queue:
            log.error("usage ledger closed with %d rows it could not write; they are lost", len(self._queue))
            self._queue.clear()
        self._gauge()
        self._closed = True
        await self._writer_process.close()

    async def _drain(self, deadline: float) -> None:
        """Flush until the queue is empty, retrying a failing database with backoff until `deadline`."""
        loop = asyncio.get_running_loop()
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
        queued: when a commit landed just before, the retry finds those rows by their request ids
        and skips them, so nothing is billed twice.)"""
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
            if (already := done - written - len(rejected)) > 0:
                log.warning(
                    "%d usage rows were in the ledger already (a batch retried after its commit went "
                    "unacknowledged): skipped, not billed twice",
                    already,
                )
            del self._queue[:done]
            self._gauge()
            if error is not None:  # the rows after `done` were not written: they stay queued
                WRITE_FAILURES.inc()
                raise LedgerWriteError(error)
            return done

    # --- reading: the reports of this ledger's database (UsageReports) ---------------------------

    async def query(self, **filters: Any) -> list[dict]:
        """Rows newest first (UsageReports.query)."""
        return await self.reports.query(**filters)

    async def totals(self, *, by: Grouping, **filters: Any) -> list[dict]:
        """Sums per day, model or key (UsageReports.totals)."""
        return await self.reports.totals(by=by, **filters)

    async def count(self, **filters: Any) -> int:
        """How many rows match (UsageReports.count)."""
        return await self.reports.count(**filters)

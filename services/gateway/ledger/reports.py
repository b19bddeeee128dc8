"""Usage reports: the usage table read back as listings (newest first), counts and totals per UTC
day, model, key or provider, for `GET /v1/usage` and `meshserve usage`. Reads run in a worker thread, off the
event loop.

Costs are summed exactly by the database (Postgres NUMERIC, SQLite integer nano-dollars) and come
out as JSON numbers, as before: the float nearest the exact Decimal, whose shortest repr is that
decimal's digits for any amount below a million USD (15 significant digits round-trip through a
double), so `Decimal(str(cost_usd))` gives the ledger's value back.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Literal

import sqlalchemy as sa

from services.gateway.ledger.schema import as_utc, usage

Grouping = Literal["day", "model", "key", "provider"]
_INT_SUMS = ("input_tokens", "output_tokens", "items")
_FLOAT_SUMS = ("compute_s", "cost_usd")


class UsageReports:
    """Reader of the `usage` table of one database. Filters: `key_id`, `model`, `since`
    (inclusive), `until` (exclusive), `provider` (who answered)."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    async def query(
        self,
        *,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        provider: str | None = None,
    ) -> list[dict]:
        """Rows newest first, as dicts of the table's columns (`time` aware UTC)."""
        stmt = (
            sa.select(usage)
            .where(*_filters(key_id, model, since, until, provider))
            .order_by(usage.c.time.desc(), usage.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return [_listed_row(row) for row in await self._read(stmt)]

    async def totals(
        self,
        *,
        by: Grouping,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        provider: str | None = None,
    ) -> list[dict]:
        """One row per day (UTC, "YYYY-MM-DD"), model, key or provider, in that order: its
        `requests` and the sums of tokens, items, compute and cost."""
        group, name = self._group_column(by)
        stmt = (
            sa.select(group.label(name), sa.func.count().label("requests"), *_sum_columns())
            .where(*_filters(key_id, model, since, until, provider))
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
        provider: str | None = None,
    ) -> int:
        """How many rows match the filters (as in `query`)."""
        where = _filters(key_id, model, since, until, provider)
        stmt = sa.select(sa.func.count().label("rows")).select_from(usage).where(*where)
        return int((await self._read(stmt))[0]["rows"])

    def _group_column(self, by: Grouping) -> tuple[sa.ColumnElement, str]:
        if by == "model":
            return usage.c.model, "model"
        if by == "key":
            return usage.c.key_id, "key_id"
        if by == "provider":
            return usage.c.provider, "provider"
        if by == "day":
            return self._utc_day(), "day"
        raise ValueError(f"totals by {by!r}: expected day, model, key or provider")

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


def _filters(
    key_id: str | None, model: str | None, since: datetime | None, until: datetime | None, provider: str | None = None
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
    if provider is not None:
        clauses.append(usage.c.provider == provider)
    return clauses


def _sum_columns() -> list[sa.Label]:
    return [sa.func.coalesce(sa.func.sum(usage.c[name]), 0).label(name) for name in _INT_SUMS + _FLOAT_SUMS]


def _listed_row(row: sa.RowMapping) -> dict:
    """A row as JSON-ready values: plain str keys (orjson), the cost a number (see the module)."""
    listed = {str(k): v for k, v in row.items()}
    listed["cost_usd"] = float(listed["cost_usd"])
    return listed


def _totals_row(row: sa.RowMapping, name: str) -> dict:
    """Plain JSON-ready values: Postgres sums integers as numeric and returns dates as `date`."""
    group = row[name]
    return {
        name: group.isoformat() if hasattr(group, "isoformat") else group,
        "requests": int(row["requests"]),
        **{field: int(row[field]) for field in _INT_SUMS},
        **{field: float(row[field]) for field in _FLOAT_SUMS},
    }

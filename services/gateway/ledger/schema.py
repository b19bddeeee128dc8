"""The usage table: one row per request the gateway answered (who, which model, tokens, compute,
cost, status), the `UsageRecord` that describes such a row, and the row's tuple form that the
queue holds and the writer process inserts (UsageRecord's fields in order).

Money is exact: `cost_usd` is a decimal of 9 places (nano-dollars, `Money`), and `request_id` is
unique, so that an insert retried after a lost acknowledgement writes nothing twice. The table's
shape is that of the Alembic migrations (`migrations/`, `migrate.py`), which create and change it.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import sqlalchemy as sa

from services.common.money import NANO, nanos, usd
from services.gateway.db import metadata

# The ledger's unit of money is a nano-dollar (the X-Usage-Cost-USD header's 9 places): usd() rounds
# an amount to it (a float read as its shortest repr: 0.1 is 0.1, not 0.1000000000000000055...),
# nanos() counts it in whole nano-dollars (how SQLite stores `Money`).
__all__ = ["NANO", "Money", "UTCDateTime", "UsageRecord", "as_utc", "nanos", "normalized_row", "usage", "usd"]


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


class Money(sa.TypeDecorator):
    """USD, exact to the nano-dollar, read back as Decimal. Postgres: NUMERIC(18, 9) (`digits`: its
    precision; 18 holds up to a billion USD less a nano-dollar). SQLite has no exact decimal (its
    NUMERIC is a float), so there it is an INTEGER of nano-dollars: sums stay exact integers. A
    float read back (a column of a release before migration 0002: REAL dollars) is taken as
    dollars, so reading an old ledger shows its costs, not nano-dollars."""

    impl = sa.Numeric(18, 9)
    cache_ok = True

    def __init__(self, digits: int = 18) -> None:
        super().__init__()
        self.digits = digits

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.BigInteger())
        return dialect.type_descriptor(sa.Numeric(self.digits, 9, asdecimal=True))

    def process_bind_param(self, value, dialect: sa.Dialect) -> Decimal | int | None:
        if value is None:
            return None
        return nanos(value) if dialect.name == "sqlite" else usd(value)

    def process_result_value(self, value, dialect: sa.Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite" and isinstance(value, int):
            return Decimal(value).scaleb(-9)
        return usd(value)


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
    sa.Column("cost_usd", Money, nullable=False, comment="USD, exact to the nano-dollar"),
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
    sa.Column(
        "attempts",
        sa.Integer,
        nullable=False,
        server_default=sa.text("1"),
        comment="providers tried for the request (1: the first answered)",
    ),
    sa.Column("upstream_request_id", sa.String(128), nullable=True, comment="the answering provider's request id"),
    sa.Index("ix_usage_key_id_time", "key_id", "time"),
    sa.Index("ix_usage_time", "time"),
    sa.Index("ux_usage_request_id", "request_id", unique=True),  # one row per request: a retried insert is a no-op
)


@dataclass(slots=True)
class UsageRecord:
    """What one request cost. Built by the gateway after it answered, success or error."""

    request_id: str
    key_id: str | None  # API key id (never the token), None when auth is off
    model: str
    task: str  # e.g. "feature-extraction", "text-classification", "embeddings"
    provider: str  # who answered: "local" for the mesh, else the providers.yaml name
    input_tokens: int
    output_tokens: int
    items: int
    compute_s: float  # inference time attributed to this request
    cost_usd: Decimal | float  # USD; the ledger keeps it as a Decimal of 9 places (usd())
    status: int  # HTTP status (or the HTTP status of the gRPC error) the caller got
    latency_s: float
    trace_id: str | None
    time: datetime  # UTC, timezone-aware; when the request started
    route: str = ""  # e.g. "/v1/embeddings", "grpc:Predict"
    client_request_id: str | None = None  # the id the caller sent, as it sent it (request_id is the gateway's)
    # (appended: a row's tuple keeps the order of older releases' fields)
    attempts: int = 1  # providers tried (failover): 1 when the first answered
    upstream_request_id: str | None = None  # the answering provider's request id (a remote one's)


# --- a row in tuple form -----------------------------------------------------------------------

FIELDS = tuple(field.name for field in dataclasses.fields(UsageRecord))
row_values = operator.attrgetter(*FIELDS)  # a record as the tuple the queue holds and the writer receives
TIME = FIELDS.index("time")
REQUEST_ID = FIELDS.index("request_id")
COST = FIELDS.index("cost_usd")
_TRACE_ID = FIELDS.index("trace_id")
_ROUNDED = tuple(FIELDS.index(name) for name in ("compute_s", "latency_s"))
# The defaults of the trailing fields, for a row of an older release's shape (fewer fields).
_DEFAULTS = tuple(field.default for field in dataclasses.fields(UsageRecord))


def normalized_row(row: tuple) -> tuple:
    """A row as the table stores it: the trace id as 32 hex digits (the queue may hold its int), the
    time an aware UTC datetime (the queue may hold unix seconds), seconds rounded to the microsecond,
    the cost a Decimal of nano-dollars (usd()), the fields an older release's row lacks at their
    defaults."""
    values = list(row)
    if len(values) < len(FIELDS):
        values.extend(_DEFAULTS[len(values) :])
    if isinstance(values[_TRACE_ID], int):
        values[_TRACE_ID] = format(values[_TRACE_ID], "032x")
    if isinstance(values[TIME], int | float):
        values[TIME] = datetime.fromtimestamp(values[TIME], UTC)
    for index in _ROUNDED:
        values[index] = round(values[index], 6)
    values[COST] = usd(values[COST])
    return tuple(values)

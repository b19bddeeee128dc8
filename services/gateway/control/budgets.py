"""Budget arithmetic both control stores share: periods, nano-dollars, and the QUOTA_EXCEEDED answer.

A key's budget is USD per period: "day" and "month" (the UTC calendar day or month:
"day:2026-12-01", "month:2026-12") or "total" (never resets). Amounts arrive as exact Decimals
(services.common.money) and are kept as integer nano-dollars, the usage ledger's unit, so sums
never drift and a budget of N times a cost admits exactly N requests. A request holds what it could cost at most, atomically with
the check (so concurrent requests never overspend together: checking spend without holding it is
the race LiteLLM's budgets have), and settling swaps the hold for what it cost. A hold never
settled (its replica died) is charged in full once its lease ends: that never lets a budget be
overspent, releasing it could.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.common.errors import ErrorCode, MeshError
from services.common.money import exact, from_nanos, nanos
from services.gateway.control.store import MAX_RETRY_AFTER_S, Reservation

log = logging.getLogger(__name__)

PERIODS = ("day", "month", "total")
EXPIRE_AFTER_PERIOD = timedelta(days=7)  # how long a store keeps a period's state after it ended
# The largest budget a key may have: 1e18 nano-dollars, well inside Redis' 64-bit integers (the
# Redis store's scripts count amounts as integer strings, never as Lua's doubles).
MAX_BUDGET_USD = 1e9
_MAX_BUDGET = Decimal(10**9)


def period_key(period: str, now: datetime) -> str:
    """The current period of a budget: "day:2026-12-01", "month:2026-12" or "total"."""
    if period == "total":
        return "total"
    return _period_key(period, now.year, now.month, now.day if period == "day" else 1)


@functools.lru_cache(maxsize=64)
def _period_key(period: str, year: int, month: int, day: int) -> str:
    if period == "day":
        return f"day:{year:04d}-{month:02d}-{day:02d}"
    if period == "month":
        return f"month:{year:04d}-{month:02d}"
    raise ValueError(f"unknown budget period {period!r}: use one of {', '.join(PERIODS)}")


@functools.lru_cache(maxsize=64)
def period_end(key: str) -> datetime | None:
    """When a period ends (UTC); None for "total"."""
    kind, _, start = key.partition(":")
    if kind == "day":
        return datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    if kind == "month":
        first = datetime.strptime(start, "%Y-%m").replace(tzinfo=UTC)
        return (first + timedelta(days=32)).replace(day=1)
    return None


@functools.lru_cache(maxsize=64)
def expire_at(key: str) -> int:
    """When a store may drop a period's state (unix s; 0 = never)."""
    end = period_end(key)
    return int((end + EXPIRE_AFTER_PERIOD).timestamp()) if end else 0


def budget_nanos(budget_usd: Decimal | float) -> int:
    """A budget in integer nano-dollars, at most MAX_BUDGET_USD (a key stored with a larger budget
    before that cap existed counts as having the cap, not as a failure on each request)."""
    return nanos(min(exact(budget_usd), _MAX_BUDGET))


def dollars(count: int) -> str:
    """Nano-dollars as $10.00, $0.30, $0.000125, $0.000000123: cents always, more digits only where
    they matter."""
    text = f"{from_nanos(count):,f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def charged(reservation: Reservation, actual_usd: Decimal | float) -> int:
    """What settling charges, in nano-dollars: the cost, clamped to [0, held] (and said when it
    had to be)."""
    actual, held = nanos(actual_usd), nanos(reservation.amount_usd)
    if 0 <= actual <= held:
        return actual
    clamped = min(max(actual, 0), held)
    log.warning(
        "request of key %s cost %s, held %s: charging %s", reservation.key_id, *map(dollars, (actual, held, clamped))
    )
    return clamped


def check_amounts(budget_usd: Decimal | float, amount_usd: Decimal | float) -> None:
    if amount_usd < 0 or budget_usd < 0:
        raise ValueError("budget and amount must not be negative")


class PeriodClock:
    """The current key of each period ("day" -> "day:2026-12-01"). With the system clock it is
    remembered until the period ends (a datetime per reservation showed on the cached path);
    `clock` (tests) gives the UTC time instead."""

    __slots__ = ("_clock", "_current")

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock
        self._current: dict[str, tuple[str, float]] = {}  # period -> (current key, when it ends, unix s)

    def now(self) -> datetime:
        return self._clock() if self._clock is not None else datetime.now(UTC)

    def key(self, period: str) -> str:
        if self._clock is not None:
            return period_key(period, self._clock())
        current = self._current.get(period)
        now = time.time()
        if current is None or now >= current[1]:
            key = period_key(period, datetime.fromtimestamp(now, UTC))
            end = period_end(key)
            current = self._current[period] = (key, end.timestamp() if end else math.inf)
        return current[0]


def quota_refusal(clock: PeriodClock, period: str, key: str, budget: int, spent: int, held: int, amount: int):
    """The QUOTA_EXCEEDED error of a hold that did not fit (amounts in nano-dollars)."""
    per = {"day": "daily", "month": "monthly", "total": "total"}[period]
    in_flight = f" and {dollars(held)} held by requests in flight" if held else ""
    left = max(0, budget - spent - held)
    err = MeshError(
        ErrorCode.QUOTA_EXCEEDED,
        f"budget exceeded: this API key's {per} budget is {dollars(budget)}; {dollars(spent)} is spent{in_flight}, "
        f"{dollars(left)} is left, and this request could cost up to {dollars(amount)}",
    )
    end = period_end(key)
    ends_in = (end - clock.now()).total_seconds() if end else math.inf
    # Waiting helps only when a new period starts soon; otherwise no Retry-After, and openai's
    # automatic retries of a 429 are switched off (they would only be refused again).
    if ends_in <= MAX_RETRY_AFTER_S:
        err.retry_after_s = max(1, math.ceil(ends_in))
    else:
        err.retry_after_s = None  # MeshError defaults a 429 to Retry-After: 1
        err.headers["x-should-retry"] = "false"
    return err

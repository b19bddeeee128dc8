"""Per-API-key spending budgets in USD per period, reserved before a request and settled after.

`reserve()` holds what a request could cost at most, atomically with the check, so concurrent
requests can never overspend together (checking spend without holding it is the race LiteLLM's
budgets have). `settle()` swaps the hold for what the request actually cost.

Periods are "day" and "month" (the UTC calendar day or month: "day:2026-12-01", "month:2026-12")
and "total" (never resets). Amounts are kept as integer micro-dollars, so sums never drift.
In Redis (`redis://…`, shared by every gateway replica) each operation is one Lua script; a
period's keys expire a week after it ends. A hold that is never settled (its replica died) is
charged in full once it is older than the reservation lease: charging it never lets a budget be
overspent, releasing it could.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import redis.asyncio as aioredis

from services.common.errors import ErrorCode, MeshError
from services.common.ids import new_id
from services.gateway.control.ratelimit import MAX_RETRY_AFTER_S, store_errors
from services.gateway.control.redis_steps import Step

log = logging.getLogger(__name__)

PERIODS = ("day", "month", "total")
MICRO = 1_000_000
KEY_PREFIX = "meshserve:budget"
EXPIRE_AFTER_PERIOD = timedelta(days=7)
# The largest budget a key may have: 1e15 micro-dollars still counts exactly in a double (Redis Lua
# numbers are doubles, exact to 2**53 ~ 9e15); far larger ones overflowed to infinity and failed
# every request of the key.
MAX_BUDGET_USD = 1e9


class Reservation(NamedTuple):
    """Money held for one request until it is settled."""

    key_id: str
    period: str  # the period it counts against, e.g. "day:2026-12-01"
    amount_usd: float
    reservation_id: str


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
def _expire_at(key: str) -> int:
    """When the store may drop a period's keys (unix s; 0 = never)."""
    end = period_end(key)
    return int((end + EXPIRE_AFTER_PERIOD).timestamp()) if end else 0


def to_micro(usd: float) -> int:
    """USD in integer micro-dollars, at most MAX_BUDGET_USD (a key stored with a larger budget
    before that cap existed counts as having the cap, not as a failure on each request)."""
    return round(min(usd, MAX_BUDGET_USD) * MICRO)


def usd(micro: float) -> str:
    """$10.00, $0.30, $0.000125: cents always, more digits only where they matter."""
    text = f"{micro / MICRO:,.6f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def charged(reservation: Reservation, actual_usd: float) -> int:
    """What settling charges, in micro-dollars: the cost, clamped to [0, held] (and said when it
    had to be)."""
    actual, held = to_micro(actual_usd), to_micro(reservation.amount_usd)
    if 0 <= actual <= held:
        return actual
    clamped = min(max(actual, 0), held)
    log.warning(
        "request of key %s cost %s, held %s: charging %s", reservation.key_id, *map(usd, (actual, held, clamped))
    )
    return clamped


class _Account:
    """One budget period of one key in process: what is spent, and the open holds in the order they
    were made (all leases are equally long, so that is also the order in which they run out)."""

    __slots__ = ("held", "reserved", "spent", "sweep_at")

    def __init__(self) -> None:
        self.spent = 0
        self.reserved = 0
        self.held: dict[str, tuple[int, float]] = {}  # id -> (micro, monotonic deadline)
        self.sweep_at = math.inf  # no hold can have run out before then (the first hold's deadline)

    def sweep(self, now: float) -> None:
        """Charge in full the holds whose lease ran out (their replica never settled them)."""
        held = self.held
        while held:
            res_id, (amount, deadline) = next(iter(held.items()))
            if deadline > now:
                self.sweep_at = deadline
                return
            del held[res_id]
            self.reserved -= amount
            self.spent += amount
        self.sweep_at = math.inf


class _MemoryBudgets:
    """One process's budgets. Nothing awaits between a check and its update, so each operation is
    atomic on the event loop without a lock."""

    def __init__(self) -> None:
        self._accounts: dict[tuple[str, str], _Account] = {}
        self._periods: set[str] = set()  # the current period of each kind, as accounts were opened

    def _account(self, account: tuple[str, str]) -> _Account:
        found = self._accounts.get(account)
        if found is None:
            if account[1] not in self._periods:
                self._new_period(account[1])
            found = self._accounts[account] = _Account()
        now = time.monotonic()
        if now >= found.sweep_at:
            found.sweep(now)
        return found

    def _new_period(self, period: str) -> None:
        """A period ("day:2026-12-02") seen for the first time: forget the accounts of the earlier
        periods of its kind that hold nothing (Redis expires them). Once per period, not per key."""
        kind = period.partition(":")[0]
        for old in [p for p in self._periods if p.partition(":")[0] == kind]:
            self._periods.discard(old)
        self._periods.add(period)
        for account in [a for a, acc in self._accounts.items() if a[1] != period and not acc.held]:
            if account[1].partition(":")[0] == kind:
                del self._accounts[account]

    def reserve_now(self, account, res_id: str, amount: int, budget: int, lease_s: float) -> tuple[bool, int, int]:
        acc = self._account(account)
        if acc.spent + acc.reserved + amount > budget:
            return False, acc.spent, acc.reserved
        self._take(acc, res_id, amount, time.monotonic() + lease_s)
        return True, acc.spent, acc.reserved

    @staticmethod
    def _take(acc: _Account, res_id: str, amount: int, deadline: float) -> None:
        if not acc.held:
            acc.sweep_at = deadline
        acc.held[res_id] = (amount, deadline)
        acc.reserved += amount

    def hold(
        self, key_id: str, period: str, amount_usd: float, budget_usd: float, lease_s: float
    ) -> Reservation | None:
        """reserve_now() for BudgetBook's fast path: the Reservation, or None (nothing held) when
        it does not fit. One call for what the cached path would otherwise pay in several."""
        account = (key_id, period)
        acc = self._accounts.get(account)
        if acc is None:
            acc = self._account(account)
        now = time.monotonic()
        if now >= acc.sweep_at:
            acc.sweep(now)
        amount = round(amount_usd * MICRO)
        if acc.spent + acc.reserved + amount > to_micro(budget_usd):
            return None
        reservation = Reservation(key_id, period, amount_usd, new_id())
        self._take(acc, reservation.reservation_id, amount, now + lease_s)
        return reservation

    def release(self, reservation: Reservation, actual_usd: float) -> None:
        """settle_now() for BudgetBook's fast path (the cost in USD, clamped as `charged()` says)."""
        acc = self._accounts.get((reservation.key_id, reservation.period))
        held = acc.held.pop(reservation.reservation_id, None) if acc is not None else None
        if held is None:
            return  # swept: charged in full
        amount = held[0]
        actual = round(actual_usd * MICRO)
        if not 0 <= actual <= amount:
            actual = charged(reservation, actual_usd)
        acc.reserved -= amount
        acc.spent += actual

    async def reserve(self, account, res_id: str, amount: int, budget: int, lease_s: float, _expire_at: int):
        return self.reserve_now(account, res_id, amount, budget, lease_s)

    async def settle(self, account, res_id: str, actual: int) -> bool:
        return self.settle_now(account, res_id, actual)

    def settle_now(self, account, res_id: str, actual: int) -> bool:
        acc = self._accounts.get(account)
        held = acc.held.pop(res_id, None) if acc is not None else None  # None: swept (charged in full)
        if held is None:
            return False
        acc.reserved -= held[0]
        acc.spent += min(actual, held[0])
        return True

    async def totals(self, account) -> tuple[int, int]:
        acc = self._account(account)
        return acc.spent, acc.reserved

    async def close(self) -> None:
        pass


# KEYS: totals hash (spent, reserved), open holds (zset id -> deadline ms), held amounts (hash id -> micro).
_SWEEP = """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function sweep(now)
  local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  for _, id in ipairs(stale) do
    local held = tonumber(redis.call('HGET', KEYS[3], id) or '0')
    redis.call('HINCRBY', KEYS[1], 'reserved', -held)
    redis.call('HINCRBY', KEYS[1], 'spent', held)
    redis.call('HDEL', KEYS[3], id)
  end
  if #stale > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  end
end
local function totals()
  return tonumber(redis.call('HGET', KEYS[1], 'spent') or '0'), tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
end
"""
# ARGV: id, amount, budget, lease ms, expire-at (unix s; 0 = never). Returns {admitted, spent, reserved}.
_RESERVE = (
    _SWEEP
    + """
local now = now_ms()
sweep(now)
local spent, reserved = totals()
local amount = tonumber(ARGV[2])
if spent + reserved + amount > tonumber(ARGV[3]) then
  return {0, spent, reserved}
end
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
redis.call('HSET', KEYS[3], ARGV[1], amount)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
if tonumber(ARGV[5]) > 0 then
  for i = 1, 3 do redis.call('EXPIREAT', KEYS[i], ARGV[5]) end
end
return {1, spent, reserved + amount}
"""
)
# ARGV: id, actual. Returns 1 when the hold was open (now settled), 0 when it was already gone.
_SETTLE = """
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held then
  return 0
end
held = tonumber(held)
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'reserved', -held)
redis.call('HINCRBY', KEYS[1], 'spent', math.min(tonumber(ARGV[2]), held))
return 1
"""
_TOTALS = _SWEEP + "sweep(now_ms())\nreturn {totals()}\n"


class _RedisBudgets:
    """Budgets shared by every replica; one Lua script per operation."""

    def __init__(self, storage_uri: str, client: aioredis.Redis | None = None) -> None:
        self._owned = client is None  # a client passed in is closed by its owner
        self._client = client if client is not None else aioredis.Redis.from_url(storage_uri)
        self._reserve = self._client.register_script(_RESERVE)
        self._settle = self._client.register_script(_SETTLE)
        self._totals = self._client.register_script(_TOTALS)

    @staticmethod
    def _keys(account: tuple[str, str]) -> list[str]:
        base = f"{KEY_PREFIX}:{{{account[0]}:{account[1]}}}"  # one hash tag: one cluster slot
        return [f"{base}:totals", f"{base}:open", f"{base}:held"]

    def reserve_step(self, account, res_id: str, amount: int, budget: int, lease_s: float, expire_at: int) -> Step:
        lease_ms = max(1, int(lease_s * 1000))
        return Step(self._reserve, self._keys(account), [res_id, amount, budget, lease_ms, expire_at])

    @staticmethod
    def reserved(reply) -> tuple[bool, int, int]:
        ok, spent, reserved = reply
        return bool(ok), int(spent), int(reserved)

    async def reserve(self, account, res_id: str, amount: int, budget: int, lease_s: float, expire_at: int):
        step = self.reserve_step(account, res_id, amount, budget, lease_s, expire_at)
        return self.reserved(await step.script(step.keys, step.args))

    def settle_step(self, account, res_id: str, actual: int) -> Step:
        return Step(self._settle, self._keys(account), [res_id, actual])

    async def settle(self, account, res_id: str, actual: int) -> bool:
        step = self.settle_step(account, res_id, actual)
        return bool(await step.script(step.keys, step.args))

    async def totals(self, account) -> tuple[int, int]:
        spent, reserved = await self._totals(self._keys(account))
        return int(spent), int(reserved)

    async def close(self) -> None:
        if self._owned:
            await self._client.aclose()


class BudgetBook:
    """Reserve-then-settle spending budgets per API key, in process or in Redis."""

    def __init__(
        self,
        storage_uri: str = "memory://",
        *,
        reservation_lease_s: float = 3600.0,
        clock: Callable[[], datetime] | None = None,
        client: aioredis.Redis | None = None,
    ) -> None:
        """`reservation_lease_s`: how long a hold may stay unsettled before it is charged in full
        (longer than any request). `clock`: the UTC time that picks the current period (default:
        the system's). `client`: a Redis client to share (with the rate limiter: their steps can
        then go in one round trip); its owner closes it."""
        if storage_uri.startswith("memory://"):
            self._store: _MemoryBudgets | _RedisBudgets = _MemoryBudgets()
        elif storage_uri.startswith(("redis://", "rediss://")):
            self._store = _RedisBudgets(storage_uri, client)
        else:
            raise ValueError(f"unsupported budget storage {storage_uri!r}: use memory:// or redis://")
        self._lease_s = reservation_lease_s
        self.remote = isinstance(self._store, _RedisBudgets)  # whether its calls wait on a store
        self._clock = clock
        self._periods: dict[str, tuple[str, float]] = {}  # period -> (current key, when it ends, unix s)

    def _now(self) -> datetime:
        return self._clock() if self._clock is not None else datetime.now(UTC)

    def _period_now(self, period: str) -> str:
        """The current key of `period`; with the system clock, remembered until the period ends
        (a datetime per reservation showed in profiles of the cached path)."""
        if self._clock is not None:
            return period_key(period, self._clock())
        now = time.time()
        current = self._periods.get(period)
        if current is None or now >= current[1]:
            key = period_key(period, datetime.fromtimestamp(now, UTC))
            end = period_end(key)
            current = self._periods[period] = (key, end.timestamp() if end else math.inf)
        return current[0]

    def reserve_now(self, key_id: str, budget_usd: float, period: str, amount_usd: float) -> Reservation | None:
        """`reserve()` without a coroutine, for the in-process store and a reservation that fits
        (the common case). None, with nothing held, when the store is remote or the budget would
        refuse: then await `reserve()`, which decides (and raises the refusal)."""
        if self.remote or amount_usd < 0 or budget_usd < 0:
            return None
        current = self._periods.get(period)
        key = current[0] if current is not None and time.time() < current[1] else self._period_now(period)
        return self._store.hold(key_id, key, amount_usd, budget_usd, self._lease_s)

    def settle_now(self, reservation: Reservation, actual_usd: float) -> bool:
        """`settle()` without a coroutine in process; False (nothing done) when the store is remote."""
        if self.remote:
            return False
        self._store.release(reservation, actual_usd)
        return True

    async def reserve(self, key_id: str, budget_usd: float, period: str, amount_usd: float) -> Reservation:
        """Hold `amount_usd` (the most this request could cost) or raise QUOTA_EXCEEDED."""
        call, decide = self._reservation(key_id, budget_usd, period, amount_usd)
        with store_errors("budget"):
            answer = await self._store.reserve(*call)
        return decide(answer)

    def reserve_step(self, key_id: str, budget_usd: float, period: str, amount_usd: float):
        """`reserve()` as a Redis step to send with others (redis_steps.run), and the function that
        turns its reply into the Reservation (or raises QUOTA_EXCEEDED). Remote books only."""
        call, decide = self._reservation(key_id, budget_usd, period, amount_usd)
        return self._store.reserve_step(*call), lambda reply: decide(self._store.reserved(reply))

    def settle_step(self, reservation: Reservation, actual_usd: float) -> Step:
        """`settle()` as a Redis step (remote books only)."""
        actual = charged(reservation, actual_usd)
        return self._store.settle_step((reservation.key_id, reservation.period), reservation.reservation_id, actual)

    def _reservation(self, key_id: str, budget_usd: float, period: str, amount_usd: float):
        if amount_usd < 0 or budget_usd < 0:
            raise ValueError("budget and amount must not be negative")
        now = self._now()
        key = period_key(period, now)
        reservation = Reservation(key_id, key, amount_usd, new_id())
        amount, budget = to_micro(amount_usd), to_micro(budget_usd)
        call = ((key_id, key), reservation.reservation_id, amount, budget, self._lease_s, _expire_at(key))

        def decide(answer: tuple[bool, int, int]) -> Reservation:
            ok, spent, reserved = answer
            if not ok:
                raise self._exceeded(period, key, budget, spent, reserved, amount, period_end(key), now)
            return reservation

        return call, decide

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Release the hold and charge what the request cost (at most what was held); idempotent."""
        actual = charged(reservation, actual_usd)
        with store_errors("budget"):
            settled = await self._store.settle(
                (reservation.key_id, reservation.period), reservation.reservation_id, actual
            )
        if not settled:
            log.debug("reservation %s was already settled or charged in full", reservation.reservation_id)

    async def spent(self, key_id: str, period: str) -> tuple[float, float]:
        """(spent, reserved) in USD in the current `period` ("day", "month" or "total")."""
        with store_errors("budget"):
            spent, reserved = await self._store.totals((key_id, period_key(period, self._now())))
        return spent / MICRO, reserved / MICRO

    async def close(self) -> None:
        await self._store.close()

    @staticmethod
    def _exceeded(period, key, budget, spent, reserved, amount, end, now) -> MeshError:
        per = {"day": "daily", "month": "monthly", "total": "total"}[period]
        in_flight = f" and {usd(reserved)} held by requests in flight" if reserved else ""
        left = max(0, budget - spent - reserved)
        err = MeshError(
            ErrorCode.QUOTA_EXCEEDED,
            f"budget exceeded: this API key's {per} budget is {usd(budget)}; {usd(spent)} is spent{in_flight}, "
            f"{usd(left)} is left, and this request could cost up to {usd(amount)}",
        )
        ends_in = (end - now).total_seconds() if end else math.inf
        # Waiting helps only when a new period starts soon; otherwise no Retry-After, and openai's
        # automatic retries of a 429 are switched off (they would only be refused again).
        if ends_in <= MAX_RETRY_AFTER_S:
            err.retry_after_s = max(1, math.ceil(ends_in))
        else:
            err.retry_after_s = None  # MeshError defaults a 429 to Retry-After: 1
            err.headers["x-should-retry"] = "false"
        return err

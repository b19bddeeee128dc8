"""The in-process ControlStore (`memory://`, the default): one gateway's windows and budget holds.

Nothing awaits between a check and its update, so every step is atomic on the event loop without
a lock, and `try_admit_now()` / `try_finish_now()` always answer in place: the gateway's cached
path pays for every Python call and object, so a step is one function that also writes the
admitted request's headers (the same ones windows.admitted_headers writes; a test holds them
equal). Per key: a deque of admission times (the moving window: append and expire at the ends),
this and the previous minute's token counts, the requests in flight. Per key and budget period:
what is spent, and the open holds in the order they were made (all leases are equally long, so
that is also the order in which they run out).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from services.common.ids import new_id
from services.common.money import ZERO, from_nanos, nanos
from services.gateway.control.budgets import PeriodClock, budget_nanos, charged, check_amounts, quota_refusal
from services.gateway.control.store import KeyLimits, Reservation, Ticket
from services.gateway.control.windows import WINDOW_S, WindowState, admitted_policy, refusal, verdict

log = logging.getLogger(__name__)


class _KeyWindows:
    """One key's limits in process: the moving window's admission times, the tokens counter (this
    minute's count and the previous minute's) and the requests in flight."""

    __slots__ = ("current", "in_flight", "minute", "previous", "times")

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.minute = 0  # the minute (index since the epoch) that `current` counts
        self.previous = 0
        self.current = 0
        self.in_flight = 0

    def roll(self, now: float) -> None:
        """Bring the tokens counter to `now`'s minute: this minute becomes the previous one (or both go)."""
        minute = int(now // WINDOW_S)
        if self.minute != minute:
            self.previous = self.current if self.minute == minute - 1 else 0
            self.current, self.minute = 0, minute


class _Account:
    """One budget period of one key in process: what is spent, and the open holds."""

    __slots__ = ("held", "reserved", "spent", "sweep_at")

    def __init__(self) -> None:
        self.spent = 0
        self.reserved = 0
        self.held: dict[str, tuple[int, float]] = {}  # id -> (nano-dollars, monotonic deadline)
        self.sweep_at = math.inf  # no hold can have run out before then (the first hold's deadline)

    def sweep(self, now: float) -> None:
        """Charge in full the holds whose lease ran out (their request never finished)."""
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

    def take(self, res_id: str, amount: int, deadline: float) -> None:
        if not self.held:
            self.sweep_at = deadline
        self.held[res_id] = (amount, deadline)
        self.reserved += amount


# The tokens item of an admitted request's header (_count) is windows.sliding_stats' reset written
# out: the current count's reset, `rest % WINDOW_S`, is `rest` itself (never below the previous
# count's) except right on the minute, where it is 0.


class LocalControlStore:
    """The ControlStore of one process (see the module docstring)."""

    def __init__(self, *, reservation_lease_s: float = 3600.0, clock: Callable[[], datetime] | None = None) -> None:
        """`reservation_lease_s`: how long a budget hold may stay unsettled before it is charged in
        full (longer than any request). `clock`: the UTC time that picks the budget period
        (default: the system's)."""
        self._keys: dict[str, _KeyWindows] = {}
        self._accounts: dict[tuple[str, str], _Account] = {}
        self._periods: set[str] = set()  # the current period of each kind, as accounts were opened
        self._lease_s = reservation_lease_s
        self.periods = PeriodClock(clock)

    # -- admission ------------------------------------------------------------------------------
    def try_admit_now(
        self,
        key_id: str,
        limits: KeyLimits | None,
        tokens_hint: int = 0,
        budget_usd: Decimal | None = None,
        period: str = "month",
        amount_usd: Decimal = ZERO,
    ) -> Ticket:
        """ControlStore.admit() in place: never None here."""
        ticket = self._count(key_id, limits, tokens_hint) if limits is not None else Ticket(key_id, None, {}, None)
        if budget_usd is not None:
            if amount_usd < 0 or budget_usd < 0:
                check_amounts(budget_usd, amount_usd)  # raises
            reservation = self._hold(key_id, self.periods.key(period), amount_usd, budget_usd)
            if reservation is None:
                self._take_back(ticket)
                raise self._quota_refusal(key_id, period, amount_usd, budget_usd)
            ticket.reservation = reservation
        return ticket

    async def admit(
        self,
        key_id: str,
        limits: KeyLimits | None,
        tokens_hint: int = 0,
        budget_usd: Decimal | None = None,
        period: str = "month",
        amount_usd: Decimal = ZERO,
    ) -> Ticket:
        return self.try_admit_now(key_id, limits, tokens_hint, budget_usd, period, amount_usd)

    def _count(self, key_id: str, limits: KeyLimits, tokens_hint: int) -> Ticket:
        """The rate-limit step: check every limit, and count the request and take its slot only if
        all admit (else raise the refusal); the ticket carries the admitted request's headers."""
        rpm, tpm, concurrent = limits
        windows = self._keys.get(key_id)
        if windows is None:
            windows = self._keys[key_id] = _KeyWindows()
        now = time.time()
        into = now % WINDOW_S
        previous = current = used = 0
        if tpm is not None:
            minute = int(now // WINDOW_S)
            if windows.minute != minute:
                windows.roll(now)
            previous, current = windows.previous, windows.current
            used = int(previous * (WINDOW_S - into) / WINDOW_S + current)  # the sliding-window counter
        times = windows.times
        if rpm is not None:
            horizon = now - WINDOW_S
            while times and times[0] <= horizon:
                times.popleft()
        count = len(times)
        if (
            (tpm is not None and tpm - used < (tokens_hint if tokens_hint > 1 else 1))
            or (concurrent is not None and windows.in_flight >= concurrent)
            or (rpm is not None and count >= rpm)
        ):
            raise self._rate_refusal(windows, limits, tokens_hint, now, used)
        value = ""
        if tpm is not None:  # windows.sliding_stats' reset, written out (see above the class)
            reset_s = (WINDOW_S - into) % (WINDOW_S / previous) if previous else (WINDOW_S - into if current else 0.0)
            if current and into == 0.0:
                reset_s = 0.0
            value = f'"tokens";r={tpm - used};t={math.ceil(reset_s)}'
        if rpm is not None:
            times.append(now)
            item = f'"requests";r={rpm - count - 1};t={math.ceil(times[0] + WINDOW_S - now)}'
            value = f"{item}, {value}" if value else item
        if concurrent is not None:
            windows.in_flight += 1
        headers = {"RateLimit": value, "RateLimit-Policy": admitted_policy(limits)} if value else {}
        return Ticket(key_id, limits, headers, now if rpm is not None else None)

    @staticmethod
    def _rate_refusal(windows: _KeyWindows, limits: KeyLimits, tokens_hint: int, now: float, used: int):
        """The refusal of `_count`, from the state it saw (as the Redis store's script reports it)."""
        rpm, tpm, concurrent = limits
        times, in_flight = windows.times, windows.in_flight
        count = len(times)
        out_of_tokens = tpm is not None and tpm - used < max(1, tokens_hint)
        busy = concurrent is not None and in_flight >= concurrent
        full = rpm is not None and count >= rpm
        previous, current = (windows.previous, windows.current) if tpm is not None else (0, 0)
        reset = (times[0] + WINDOW_S - now) if count else 0.0
        state = WindowState(
            verdict(out_of_tokens, busy, full), count, reset, previous, current, now % WINDOW_S, in_flight
        )
        return refusal(limits, tokens_hint, state)

    def _take_back(self, ticket: Ticket) -> None:
        """Undo `_count` for a request its budget refused: out of the requests window, slot freed."""
        if ticket.limits is not None and ticket.mark is not None:
            with contextlib.suppress(ValueError):  # it already left the window
                self._keys[ticket.key_id].times.remove(ticket.mark)
        self.try_finish_now(ticket, 0, ZERO)

    def _hold(self, key_id: str, period_key: str, amount_usd: Decimal, budget_usd: Decimal) -> Reservation | None:
        """The budget step: hold `amount_usd` if it fits, else None (nothing held)."""
        account = (key_id, period_key)
        acc = self._accounts.get(account)
        if acc is None:
            acc = self._account(account)
        now = time.monotonic()
        if now >= acc.sweep_at:
            acc.sweep(now)
        amount = nanos(amount_usd)
        if acc.spent + acc.reserved + amount > budget_nanos(budget_usd):
            return None
        reservation = Reservation(key_id, period_key, from_nanos(amount), new_id())
        acc.take(reservation.reservation_id, amount, now + self._lease_s)
        return reservation

    def _quota_refusal(self, key_id: str, period: str, amount_usd: Decimal, budget_usd: Decimal):
        key = self.periods.key(period)
        acc = self._account((key_id, key))
        return quota_refusal(
            self.periods, period, key, budget_nanos(budget_usd), acc.spent, acc.reserved, nanos(amount_usd)
        )

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

    # -- completion -----------------------------------------------------------------------------
    def try_finish_now(self, ticket: Ticket, tokens: int, cost_usd: Decimal) -> bool:
        """ControlStore.finish() in place: always True here."""
        if ticket.finished:
            return True
        ticket.finished = True
        if ticket.reservation is not None:
            try:
                self._settle(ticket.reservation, cost_usd)
            except Exception:  # on the way out of a request: never replace its answer
                log.exception("could not settle the budget hold of a request of key %s", ticket.key_id)
        limits = ticket.limits
        if limits is not None:
            self._release(self._keys[ticket.key_id], limits, tokens)
        return True

    async def finish(self, ticket: Ticket, tokens: int, cost_usd: Decimal) -> None:
        self.try_finish_now(ticket, tokens, cost_usd)

    @staticmethod
    def _release(windows: _KeyWindows, limits: KeyLimits, tokens: int) -> None:
        """Charge the tokens (beyond the room left, the window saturates: the overshoot is not
        carried over) and free the slot."""
        _, tpm, concurrent = limits
        if tpm is not None and tokens > 0:
            now = time.time()
            if windows.minute != int(now // WINDOW_S):
                windows.roll(now)
            room = tpm - int(windows.previous * (WINDOW_S - now % WINDOW_S) / WINDOW_S + windows.current)
            charge = tokens if tokens < room else room
            if charge > 0:
                windows.current += charge
        if concurrent is not None:
            windows.in_flight -= 1

    def _settle(self, reservation: Reservation, actual_usd: Decimal) -> None:
        """Swap the hold for the cost (clamped to [0, held], as `charged()` says); a hold already
        swept was charged in full."""
        acc = self._accounts.get((reservation.key_id, reservation.period))
        held = acc.held.pop(reservation.reservation_id, None) if acc is not None else None
        if held is None:
            return
        amount = held[0]
        actual = nanos(actual_usd)
        if not 0 <= actual <= amount:
            actual = min(charged(reservation, actual_usd), amount)
        acc.reserved -= amount
        acc.spent += actual

    # -- reports --------------------------------------------------------------------------------
    async def spent(self, key_id: str, period: str) -> tuple[Decimal, Decimal]:
        acc = self._account((key_id, self.periods.key(period)))
        return from_nanos(acc.spent), from_nanos(acc.reserved)

    async def close(self) -> None:
        pass

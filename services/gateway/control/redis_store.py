"""The Redis ControlStore (`redis://…`): windows and budget holds shared by every gateway replica.

Each step is one Lua script (redis_scripts). Admission sends the rate-limit step and the budget
step together, finishing sends the settlement and the release together, and concurrent requests'
steps share round trips (redis_steps.Batcher): one round trip per phase, whatever the limits. When
one step of an admission refuses, the other is undone. Concurrency slots are leased (a sorted set
per key, score = lease deadline) and budget holds too, so a replica that dies holding them leaks
them only until their lease ends. The synchronous fast path always declines here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

import redis.asyncio as aioredis

from services.common.errors import MeshError
from services.common.ids import new_id
from services.common.money import ZERO, from_nanos, nanos, usd
from services.gateway.control import redis_scripts, redis_steps
from services.gateway.control.budgets import (
    PeriodClock,
    budget_nanos,
    charged,
    check_amounts,
    expire_at,
    quota_refusal,
)
from services.gateway.control.redis_steps import Step
from services.gateway.control.store import KeyLimits, Reservation, Ticket, store_errors
from services.gateway.control.windows import WindowState, admitted_headers, refusal

log = logging.getLogger(__name__)


class RedisControlStore:
    """The ControlStore in a Redis shared by replicas (see the module docstring)."""

    def __init__(
        self,
        storage_uri: str,
        *,
        slot_lease_s: float = 600.0,
        reservation_lease_s: float = 3600.0,
        clock: Callable[[], datetime] | None = None,
        client: aioredis.Redis | None = None,
    ) -> None:
        """`storage_uri`: `redis://host:port/db` (`rediss://` for TLS). `slot_lease_s`: how long a
        concurrency slot outlives a replica that died holding it (a request running longer stops
        counting against the limit). `reservation_lease_s`: how long a budget hold may stay
        unsettled before it is charged in full. `clock`: the UTC time that picks the budget period.
        `client`: a Redis client to use; its owner closes it."""
        self._owned = client is None
        self._client = client if client is not None else aioredis.Redis.from_url(storage_uri)
        self._batcher = redis_steps.Batcher(self._client)
        self._slot_lease_ms = max(1, int(slot_lease_s * 1000))
        self._hold_lease_ms = max(1, int(reservation_lease_s * 1000))
        self.periods = PeriodClock(clock)
        register = self._client.register_script
        self._admit_script, self._done_script = register(redis_scripts.ADMIT), register(redis_scripts.DONE)
        self._reserve_script, self._settle_script = register(redis_scripts.RESERVE), register(redis_scripts.SETTLE)
        self._totals_script = register(redis_scripts.TOTALS)

    # -- the steps ------------------------------------------------------------------------------
    def rate_step(self, key_id: str, limits: KeyLimits, tokens_hint: int, slot: str) -> Step:
        """Count the request and take its slot if every limit admits."""
        rpm, tpm, concurrent = (-1 if limit is None else limit for limit in limits)
        args = [rpm, tpm, concurrent, max(1, tokens_hint), slot, self._slot_lease_ms]
        return Step(self._admit_script, redis_scripts.rate_limit_keys(key_id), args)

    def release_step(self, ticket: Ticket, tokens: int, refund: bool = False) -> Step | None:
        """Charge the tokens and free the slot (`refund`: also take the request out of the requests
        window); None when there is nothing to do."""
        _, tpm, concurrent = ticket.limits
        slot = ticket.mark if concurrent is not None else ""
        if not (refund or slot or (tpm is not None and tokens > 0)):
            return None
        args = [-1 if tpm is None else tpm, tokens, slot, ticket.mark if refund else ""]
        return Step(self._done_script, redis_scripts.rate_limit_keys(ticket.key_id), args)

    def hold_step(self, reservation: Reservation, budget_usd: Decimal) -> Step:
        """Hold the reservation's amount if it fits in the budget (nano-dollars)."""
        key = reservation.period
        args = [reservation.reservation_id, nanos(reservation.amount_usd), budget_nanos(budget_usd)]
        args += [self._hold_lease_ms, expire_at(key)]
        return Step(self._reserve_script, redis_scripts.budget_keys(reservation.key_id, key), args)

    def settle_step(self, reservation: Reservation, cost_usd: Decimal) -> Step:
        """Swap the hold for the cost (clamped to what was held)."""
        args = [reservation.reservation_id, charged(reservation, cost_usd)]
        return Step(self._settle_script, redis_scripts.budget_keys(reservation.key_id, reservation.period), args)

    # -- admission ------------------------------------------------------------------------------
    def try_admit_now(self, key_id, limits, tokens_hint=0, budget_usd=None, period="month", amount_usd=ZERO) -> None:
        """Shared state changes only in Redis' atomic scripts: always await `admit()`."""
        return None

    async def admit(
        self,
        key_id: str,
        limits: KeyLimits | None,
        tokens_hint: int = 0,
        budget_usd: Decimal | None = None,
        period: str = "month",
        amount_usd: Decimal = ZERO,
    ) -> Ticket:
        ticket = Ticket(key_id, limits, {}, new_id())
        steps: list[Step] = []
        if limits is not None:
            steps.append(self.rate_step(key_id, limits, tokens_hint, ticket.mark))
        if budget_usd is not None:
            check_amounts(budget_usd, amount_usd)
            ticket.reservation = Reservation(key_id, self.periods.key(period), usd(amount_usd), new_id())
            steps.append(self.hold_step(ticket.reservation, budget_usd))
        if not steps:
            return ticket
        with store_errors("rate-limit" if limits is not None else "budget"):
            replies = await self._batcher.run(steps)
        refusals = self._decide(ticket, tokens_hint, budget_usd, period, replies)
        if refusals:
            await self._undo(ticket, refusals)
            raise refusals[0][1]
        return ticket

    def _decide(self, ticket: Ticket, tokens_hint: int, budget_usd, period: str, replies: list) -> list:
        """Read the steps' replies into the ticket; returns the refusals as (step, error) pairs, the
        rate limit's first (a store error of a step is its refusal: retryable UPSTREAM_UNAVAILABLE)."""
        refusals = []
        if ticket.limits is not None:
            try:
                with store_errors("rate-limit"):
                    ticket.headers = self._admitted(ticket.limits, tokens_hint, _reply(replies[0]))
            except MeshError as err:
                refusals.append(("rate-limit", err))
        if ticket.reservation is not None:
            try:
                with store_errors("budget"):
                    self._reserved(ticket.reservation, budget_usd, period, _reply(replies[-1]))
            except MeshError as err:
                refusals.append(("budget", err))
        return refusals

    @staticmethod
    def _admitted(limits: KeyLimits, tokens_hint: int, reply) -> dict[str, str]:
        verdict, count, reset_ms, previous, current, into_ms, in_flight = reply
        state = WindowState(
            verdict.decode(), int(count), reset_ms / 1000, int(previous), int(current), into_ms / 1000, int(in_flight)
        )
        if state.verdict != "ok":
            raise refusal(limits, tokens_hint, state)
        return admitted_headers(limits, state)

    def _reserved(self, reservation: Reservation, budget_usd: Decimal, period: str, reply) -> None:
        ok, spent, held = reply
        if not ok:
            budget, amount = budget_nanos(budget_usd), nanos(reservation.amount_usd)
            raise quota_refusal(self.periods, period, reservation.period, budget, int(spent), int(held), amount)

    async def _undo(self, ticket: Ticket, refusals: list) -> None:
        """Take back the steps of a refused admission that went through, each in its own round trip
        (never raises: what cannot be undone is reclaimed when its lease ends)."""
        refused = {step for step, _ in refusals}
        ticket.finished = True
        if ticket.limits is not None and "rate-limit" not in refused:
            step = self.release_step(ticket, 0, refund=True)
            try:
                await step.script(step.keys, step.args)
            except Exception:
                log.exception("could not take back the admission of a refused request of key %s", ticket.key_id)
        if ticket.reservation is not None and "budget" not in refused:
            step = self.settle_step(ticket.reservation, ZERO)
            try:
                await step.script(step.keys, step.args)
            except Exception:  # left to its lease, then charged in full: say so
                log.exception("could not release the budget hold of a refused request of key %s", ticket.key_id)

    # -- completion -----------------------------------------------------------------------------
    def try_finish_now(self, ticket: Ticket, tokens: int, cost_usd: Decimal) -> bool:
        return False

    async def finish(self, ticket: Ticket, tokens: int, cost_usd: Decimal) -> None:
        if ticket.finished:
            return
        ticket.finished = True
        steps = []
        if ticket.reservation is not None:
            steps.append(self.settle_step(ticket.reservation, cost_usd))
        if ticket.limits is not None and (release := self.release_step(ticket, tokens)) is not None:
            steps.append(release)
        if not steps:
            return
        try:
            replies = await self._batcher.run(steps)
        except Exception:
            log.exception("could not settle or release a request of key %s", ticket.key_id)
            return
        for reply in replies:
            if isinstance(reply, Exception):
                log.error("could not settle or release a request of key %s: %r", ticket.key_id, reply)

    # -- reports --------------------------------------------------------------------------------
    async def spent(self, key_id: str, period: str) -> tuple[Decimal, Decimal]:
        with store_errors("budget"):
            spent, held = await self._totals_script(redis_scripts.budget_keys(key_id, self.periods.key(period)))
        return from_nanos(int(spent)), from_nanos(int(held))

    async def close(self) -> None:
        if self._owned:
            await self._client.aclose()


def _reply(reply):
    """A step's reply, or the error Redis answered it with, raised."""
    if isinstance(reply, Exception):
        raise reply
    return reply

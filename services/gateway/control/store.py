"""The control store: where a key's rate-limit windows and budget holds live, behind one protocol.

`ControlStore.admit()` checks a request against its key's limits and budget in one atomic step and
answers a `Ticket` (its rate-limit slot, its budget hold, the RateLimit headers to send) or raises
the refusal as a MeshError; `finish(ticket, tokens, cost_usd)` charges what the request used and
releases the rest. Money is exact: amounts are Decimals of USD (services.common.money), counted by
the stores in integer nano-dollars. `try_admit_now()` / `try_finish_now()` are the same calls
without a coroutine, for a store that can answer in place (in process); a store that cannot answers
None / False and the caller awaits the coroutine. Implementations: local_store (in process) and redis_store (shared by
replicas). Also here: the error policy both follow (a store outage is a retryable 503, a
Retry-After is a whole number of seconds up to what openai still honours).
"""

from __future__ import annotations

import logging
import math
from decimal import Decimal
from typing import NamedTuple, Protocol

try:
    from redis.exceptions import RedisError
except ModuleNotFoundError:  # no `meshserve[redis]`: no Redis store runs, so no Redis error can reach here

    class RedisError(Exception):
        pass


from services.common.errors import ErrorCode, MeshError
from services.common.money import ZERO

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 120  # openai gives up on a Retry-After above this


class KeyLimits(NamedTuple):
    """One API key's rate limits; None = unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion
    concurrent_requests: int | None = None


class Reservation(NamedTuple):
    """Money held for one request until it is settled."""

    key_id: str
    period: str  # the period it counts against, e.g. "day:2026-12-01"
    amount_usd: Decimal  # exact, to the nano-dollar
    reservation_id: str


class Ticket:
    """An admitted request's claim on its key's limits and budget, until the store finishes it.
    Callers read `headers`; the rest is the store's (the same type from every store)."""

    __slots__ = ("finished", "headers", "key_id", "limits", "mark", "reservation")

    def __init__(self, key_id: str, limits: KeyLimits | None, headers: dict[str, str], mark: object) -> None:
        self.key_id = key_id
        self.limits = limits  # None: the request counts against no rate limit
        self.headers = headers  # the RateLimit / RateLimit-Policy headers of the admission
        # The request in its key's windows: its admission time (in process) or its slot id (Redis).
        self.mark = mark
        self.reservation: Reservation | None = None  # the budget hold, if the key has a budget
        self.finished = False


class ControlStore(Protocol):
    """Rate-limit windows and budget holds of every API key, in one place (see the module docstring)."""

    async def admit(
        self,
        key_id: str,
        limits: KeyLimits | None,
        tokens_hint: int = 0,
        budget_usd: Decimal | None = None,
        period: str = "month",
        amount_usd: Decimal = ZERO,
    ) -> Ticket:
        """Count one request of `key_id` against `limits` (None: no rate limit; `tokens_hint`: the
        most tokens it may use) and hold `amount_usd` (the most it can cost) of its `budget_usd` per
        `period` (None: no budget), all or nothing; raise RATE_LIMITED or QUOTA_EXCEEDED otherwise
        (a rate-limit refusal first). A refused request is not counted and holds nothing."""
        ...

    def try_admit_now(
        self,
        key_id: str,
        limits: KeyLimits | None,
        tokens_hint: int = 0,
        budget_usd: Decimal | None = None,
        period: str = "month",
        amount_usd: Decimal = ZERO,
    ) -> Ticket | None:
        """`admit()` without a coroutine (it raises the same refusals), or None with nothing done:
        then await `admit()`."""
        ...

    async def finish(self, ticket: Ticket, tokens: int, cost_usd: Decimal) -> None:
        """Charge `tokens` (prompt + completion) to the tokens window, settle the hold at `cost_usd`
        (at most what was held), free the slot. Idempotent; never raises (it runs on the way out
        of a request: a store outage is logged and the leases reclaim what it could not free)."""
        ...

    def try_finish_now(self, ticket: Ticket, tokens: int, cost_usd: Decimal) -> bool:
        """`finish()` without a coroutine: True when done, False with nothing done (then await it)."""
        ...

    async def spent(self, key_id: str, period: str) -> tuple[Decimal, Decimal]:
        """(spent, held) in USD in the current `period` ("day", "month" or "total") of a key."""
        ...

    async def close(self) -> None: ...


def retry_after(seconds: float) -> int:
    """A Retry-After in whole seconds: at least 1, at most MAX_RETRY_AFTER_S."""
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds)))


class store_errors:
    """A store outage (Redis) refuses the request as retryable (503), never as an internal error.
    (A class: it is entered on every request, and a generator-based one costs several times more.)"""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what  # "rate-limit" or "budget": which store the refusal names

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, _tb) -> bool:
        if kind is not None and issubclass(kind, RedisError):
            log.warning("%s store unavailable: %r", self.what, exc)
            raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, f"{self.what} store is unavailable") from exc
        return False

"""Admission and accounting around every inference request: the key's restrictions, then the
control store's admission (rate limits and the budget hold, one Ticket), and afterwards the
store's finish (the real cost settled, the slot freed), the usage ledger row and the usage headers.

Budgets never overspend under concurrency because admission *holds* the request's maximum cost
before any work starts and finishing settles the real cost, releasing the rest. The maximum is
computed at the gateway without a tokenizer (service/bounds.py): a text never yields more tokens than its UTF-8 bytes
plus the two special tokens, nor more than the model's token limit (longer texts are truncated or
refused), and a request never computes longer than its deadline. So admission costs no
preprocessing RPC and coalescing stays possible; the settled cost uses the real token counts from
preprocess. Each phase tries the store's synchronous fast path first (in process it always
answers: the cached path pays for every coroutine), then awaits the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from services.common import tracing
from services.common.catalog import ModelEntry, PricingSpec
from services.common.errors import MeshError
from services.common.money import ZERO, usd
from services.gateway.control import genai
from services.gateway.control.auth import Principal

if TYPE_CHECKING:
    from services.gateway.control.store import ControlStore, Ticket

log = logging.getLogger(__name__)


class UsageSink(Protocol):
    """Where metering writes a request's usage row (the usage ledger: UsageLedger.append)."""

    def append(self, row: tuple) -> None: ...


def _cost(metered: Metered, status: int) -> Decimal:
    """What a finished request costs: failed requests nothing, unless their stream had delivered
    tokens (a stream that dies mid-way pays for what the client got); one the caller abandoned
    (499, a closed stream) what it consumed up to then."""
    return metered.cost_of() if status < 400 or status == 499 or metered.delivered else ZERO


class Metered:
    """One admitted request, from admission to its ledger row."""

    __slots__ = (
        "_cost",
        "_delivered",
        "attempts",
        "client_request_id",
        "compute_s",
        "cost_usd",
        "entry",
        "finished",
        "first_token_at",
        "input_tokens",
        "items",
        "output_tokens",
        "pricing",
        "principal",
        "provider",
        "request_id",
        "route",
        "routed",
        "started",
        "task",
        "ticket",
        "time",
        "upstream_request_id",
    )

    def __init__(
        self,
        principal: Principal,
        entry: ModelEntry,
        task: str,
        route: str,
        request_id: str,
        ticket: Ticket | None,
        *,
        finished: bool = False,
        client_request_id: str | None = None,
        pricing: PricingSpec | None = None,
    ) -> None:
        """`entry`: the catalog's ModelEntry, or a remote-only model (anything with an `id`);
        `pricing`: what it costs (default: the entry's)."""
        self.principal = principal
        self.client_request_id = client_request_id  # the caller's X-Request-Id (request_id is ours)
        self.entry = entry
        self.task = task
        self.route = route
        self.request_id = request_id
        self.ticket = ticket  # the control store's admission; None: nothing to finish there
        self.started = time.perf_counter()
        self.time = time.time()  # when the request started (unix s; the ledger row's `time`)
        self.input_tokens = 0
        self.output_tokens = 0
        self.items = 0
        self.compute_s = 0.0
        self.cost_usd = ZERO  # USD, exact to the nano-dollar (set when the request finishes)
        self.finished = finished
        # Who answered and how (the routing service sets them for a routed request).
        self.pricing = entry.pricing if pricing is None else pricing
        self.provider = "local"
        self.attempts = 1
        self.routed = False  # the provider layer chose among candidates (its answer names the provider)
        self.upstream_request_id: str | None = None
        self._delivered = False
        self._cost: tuple = ()  # (what cost_of() last priced, its cost)
        self.first_token_at: float | None = None  # perf_counter() when a token first reached the client

    @property
    def delivered(self) -> bool:
        """A streamed token reached the client: a failure from then on still pays for it."""
        return self._delivered

    @delivered.setter
    def delivered(self, value: bool) -> None:
        if value and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._delivered = value

    def add(self, *, input_tokens: int = 0, output_tokens: int = 0, items: int = 0, compute_s: float = 0.0) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.items += items
        self.compute_s += compute_s

    def rate_headers(self) -> dict[str, str]:
        """Only the rate-limit state (what a stream can send before its usage is known)."""
        return dict(self.ticket.headers) if self.ticket else {}

    def headers(self) -> dict[str, str]:
        """Usage and cost of this request, plus its rate-limit state, for the response."""
        headers = {
            "X-Usage-Input-Tokens": str(self.input_tokens),
            "X-Usage-Output-Tokens": str(self.output_tokens),
            "X-Usage-Cost-USD": f"{self.cost_of():f}",
        }
        if self.ticket is not None:
            headers.update(self.ticket.headers)
        if self.routed:  # who answered, after how many attempts
            headers |= {"X-Meshserve-Provider": self.provider, "X-Meshserve-Attempts": str(self.attempts)}
        return headers

    def cost_of(self) -> Decimal:
        """What the request cost so far: USD, exact, rounded (half even) to the nano-dollar. (The
        last answer is kept: finishing and the response's headers ask for the same one, and
        Decimal arithmetic costs microseconds.)"""
        usage = (self.input_tokens, self.output_tokens, self.compute_s, self.pricing)
        if not self._cost or self._cost[0] != usage:
            self._cost = (usage, usd(self.pricing.cost(*usage[:3])))
        return self._cost[1]


class Metering:
    def __init__(self, store: ControlStore | None, ledger: UsageSink | None, *, timeout_s: float) -> None:
        """`store`: the keys' rate-limit windows and budget holds (None: nothing is limited);
        `ledger`: where each request's usage row goes (None: nowhere); `timeout_s`: the longest a
        request computes (what its budget hold assumes)."""
        self.store = store
        self.ledger = ledger
        self.timeout_s = timeout_s

    @classmethod
    def disabled(cls) -> Metering:
        """No limits, budgets or ledger: every request is admitted and nothing is recorded."""
        return cls(None, None, timeout_s=0.0)

    async def admit(
        self,
        principal: Principal,
        entry: ModelEntry,
        task: str,
        route: str,
        request_id: str,
        *,
        max_input_tokens: int,
        max_output_tokens: int = 0,
        client_request_id: str | None = None,
        tokens_hint: int | None = None,
        pricing: PricingSpec | None = None,
    ) -> Metered:
        """Key restrictions, then the store's admission (rate limits, then the budget hold at
        `pricing`, default the entry's: a routed request holds at its dearest candidate's); raises
        the refusal (which gets its own ledger row, with its status and no cost)."""
        key = principal.key
        ticket = None
        try:
            if key.models or key.tasks:
                principal.allow(entry.id, task)
            store, limits, budget = self.store, principal.limits, key.budget_usd
            if store is not None and (limits is not None or budget is not None):
                # The tokens-per-minute room to look for: an estimate (the window charges the real
                # count afterwards); by default the bound the budget holds.
                hint = max_input_tokens + max_output_tokens if tokens_hint is None else tokens_hint
                # The most it can cost: every token it may read and write, computing until its deadline.
                price = entry.pricing if pricing is None else pricing
                amount = (
                    ZERO if budget is None else usd(price.cost(max_input_tokens, max_output_tokens, self.timeout_s))
                )
                period = key.budget_period or "month"
                ticket = store.try_admit_now(key.id, limits, hint, budget, period, amount) or await store.admit(
                    key.id, limits, hint, budget, period, amount
                )
        except MeshError as err:
            self._record_refusal(principal, entry, task, route, request_id, err, client_request_id, pricing)
            raise
        return Metered(
            principal, entry, task, route, request_id, ticket, client_request_id=client_request_id, pricing=pricing
        )

    def _record_refusal(
        self, principal, entry, task, route, request_id, err: MeshError, client_request_id=None, pricing=None
    ) -> None:
        """A refused request's ledger row (its status, no cost) and GenAI metrics."""
        refused = Metered(principal, entry, task, route, request_id, None, finished=True, pricing=pricing)
        genai.record(refused, err.code.http_status)
        if self.ledger is not None:
            refused.client_request_id = client_request_id
            self.ledger.append(self._row(refused, err.code.http_status))

    def finish_now(self, metered: Metered, status: int) -> bool:
        """`finish()` without a coroutine, when the store finishes in place (in process): True when
        done, False with nothing done (then await `finish()`)."""
        if metered.finished:
            return True
        ticket = metered.ticket
        cost = _cost(metered, status)
        if ticket is not None:
            try:
                if not self.store.try_finish_now(ticket, metered.input_tokens + metered.output_tokens, cost):
                    return False
            except Exception:  # on the way out: a store failure must not replace the response
                log.exception("could not settle or release request %s", metered.request_id)
        metered.finished = True
        self._record(metered, status, cost)
        return True

    async def finish(self, metered: Metered, status: int) -> None:
        """Settle the budget hold with the real cost, release the rate-limit slot, write the ledger
        row. Failed requests cost nothing. Idempotent; never raises."""
        if self.finish_now(metered, status):
            return
        metered.finished = True
        cost = _cost(metered, status)
        try:
            await self.store.finish(metered.ticket, metered.input_tokens + metered.output_tokens, cost)
        except Exception:  # (a store's finish never raises; this is the last line)
            log.exception("could not settle or release request %s", metered.request_id)
        finally:
            self._record(metered, status, cost)

    def _record(self, metered: Metered, status: int, cost: Decimal) -> None:
        """The finished request's cost and its ledger row."""
        metered.cost_usd = cost
        genai.record(metered, status)
        if self.ledger is not None:
            self.ledger.append(self._row(metered, status))

    @staticmethod
    def _row(m: Metered, status: int) -> tuple:
        """The ledger row, as UsageLedger.append() takes it: the trace id as its int and the time
        as unix seconds (the writer process formats both)."""
        return (
            m.request_id,
            m.principal.key.id or None,
            m.entry.id,
            m.task,
            m.provider,
            m.input_tokens,
            m.output_tokens,
            m.items,
            m.compute_s,
            m.cost_usd,
            status,
            time.perf_counter() - m.started,
            tracing.current_trace_id(),
            m.time,
            m.route,
            m.client_request_id,
            m.attempts,
            m.upstream_request_id,
        )

    def track(self, metered: Metered) -> _Tracked:
        """`async with metering.track(metered):` finishes `metered` with the status the block
        ended in (a MeshError's, 499 if the caller went away, 500 for anything else); the finish
        itself cannot be cancelled (it is shielded when it awaits a store or the caller is already
        gone)."""
        return _Tracked(self, metered)


class _Tracked:
    """Metering.track()'s context manager (a class: it is entered on every request, and a
    generator-based one costs several times more)."""

    __slots__ = ("_metered", "_metering")

    def __init__(self, metering: Metering, metered: Metered) -> None:
        self._metering = metering
        self._metered = metered

    async def __aenter__(self) -> Metered:
        return self._metered

    async def __aexit__(self, kind, exc, _tb) -> bool:
        if kind is None:
            status = 200
        elif issubclass(kind, MeshError):
            status = exc.code.http_status
        elif issubclass(kind, (asyncio.CancelledError, GeneratorExit)):  # the caller went away
            status = 499
        else:
            status = 500
        metering = self._metering
        # In place when the store can (no task for a shield: nothing in it can be interrupted).
        if status == 499 or not metering.finish_now(self._metered, status):
            await asyncio.shield(metering.finish(self._metered, status))
        return False

    async def fail(self, exc: BaseException) -> None:
        """Finish the request as failed by `exc` (work after admission that raised outside the
        `async with`, e.g. tokenizing a prompt before its stream starts)."""
        await self.__aexit__(type(exc), exc, exc.__traceback__)

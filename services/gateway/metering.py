"""Admission and accounting around every inference request: key restrictions, rate limits, the
budget reservation, and afterwards the settlement, the usage ledger row and the usage headers.

Budgets never overspend under concurrency because admission *reserves* the request's maximum cost
before any work starts and completion settles the real cost, releasing the rest (the reservation
is atomic in the BudgetBook, across replicas with Redis). The maximum is computed at the gateway
without a tokenizer: a text never yields more tokens than its UTF-8 bytes plus the two special
tokens, nor more than the model's token limit (longer texts are truncated or refused), and a
request never computes longer than its deadline. So admission costs no preprocessing RPC and
coalescing stays possible; the settled cost uses the real token counts from preprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from meshserve.tasks.v1 import tasks_pb2
from opentelemetry import trace

from services.common.catalog import ModelEntry
from services.common.errors import MeshError
from services.gateway.auth import Principal
from services.gateway.ledger import UsageLedger, UsageRecord
from services.gateway.ratelimit import KeyLimits

if TYPE_CHECKING:
    from services.gateway.budgets import BudgetBook, Reservation
    from services.gateway.ratelimit import Admission, RateLimiter

log = logging.getLogger(__name__)


def text_token_bound(entry: ModelEntry, texts) -> int:
    """Most tokens these texts can be encoded to (see the module docstring)."""
    limit = entry.preprocess.max_length
    return sum(min(limit, len(t.encode()) + 2) for t in texts)


def token_bound(entry: ModelEntry, inputs: tasks_pb2.TaskInputs, parameters: tasks_pb2.TaskParameters) -> int:
    kind = inputs.WhichOneof("kind")
    if kind == "text":
        texts = list(inputs.text.texts)
        if parameters.candidate_labels:  # zero-shot: each text and one hypothesis per label
            template = parameters.hypothesis_template or entry.postprocess.zero_shot.hypothesis_template
            hypotheses = [template.replace("{}", label) for label in parameters.candidate_labels]
            return text_token_bound(entry, texts) + len(texts) * text_token_bound(entry, hypotheses)
        return text_token_bound(entry, texts)
    if kind == "sentence_similarity":
        sim = inputs.sentence_similarity
        return text_token_bound(entry, [sim.source_sentence, *sim.sentences])
    return 0  # images: no tokens


@dataclass
class Metered:
    """One admitted request, from admission to its ledger row."""

    principal: Principal
    entry: ModelEntry
    task: str
    route: str
    request_id: str
    admission: Admission | None
    reservation: Reservation | None
    started: float = field(default_factory=time.perf_counter)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    input_tokens: int = 0
    output_tokens: int = 0
    items: int = 0
    compute_s: float = 0.0
    cost_usd: float = 0.0
    finished: bool = False

    def add(self, *, input_tokens: int = 0, output_tokens: int = 0, items: int = 0, compute_s: float = 0.0) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.items += items
        self.compute_s += compute_s

    def rate_headers(self) -> dict[str, str]:
        """Only the rate-limit state (what a stream can send before its usage is known)."""
        return dict(self.admission.headers) if self.admission else {}

    def headers(self) -> dict[str, str]:
        """Usage and cost of this request, plus its rate-limit state, for the response."""
        headers = self.rate_headers()
        headers.update(
            {
                "X-Usage-Input-Tokens": str(self.input_tokens),
                "X-Usage-Output-Tokens": str(self.output_tokens),
                "X-Usage-Cost-USD": f"{self.cost_of():.9f}",
            }
        )
        return headers

    def cost_of(self) -> float:
        return self.entry.pricing.cost(self.input_tokens, self.output_tokens, self.compute_s)


class Metering:
    def __init__(
        self, limiter: RateLimiter | None, budgets: BudgetBook | None, ledger: UsageLedger | None, *, timeout_s: float
    ) -> None:
        self.limiter = limiter
        self.budgets = budgets
        self.ledger = ledger
        self.timeout_s = timeout_s
        # Whether finishing awaits a store (Redis); in process it completes without suspending.
        self._finish_awaits = any(part is not None and part.remote for part in (limiter, budgets))

    def max_cost(self, entry: ModelEntry, max_input_tokens: int, max_output_tokens: int) -> float:
        return entry.pricing.cost(max_input_tokens, max_output_tokens, self.timeout_s)

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
    ) -> Metered:
        """Key restrictions, then rate limits, then the budget reservation; raises the refusal
        (which gets its own ledger row, with its status and no cost)."""
        try:
            return await self._admit(principal, entry, task, route, request_id, max_input_tokens, max_output_tokens)
        except MeshError as err:
            if self.ledger is not None:
                refused = Metered(principal, entry, task, route, request_id, None, None, finished=True)
                self.ledger.record(self._record(refused, err.code.http_status))
            raise

    async def _admit(self, principal, entry, task, route, request_id, max_input_tokens, max_output_tokens) -> Metered:
        principal.allow(entry.id, task)
        key = principal.key
        admission = reservation = None
        if self.limiter is not None and (
            key.requests_per_minute is not None
            or key.tokens_per_minute is not None
            or key.concurrent_requests is not None
        ):
            limits = KeyLimits(key.requests_per_minute, key.tokens_per_minute, key.concurrent_requests)
            admission = await self.limiter.admit(key.id, limits, tokens_hint=max_input_tokens + max_output_tokens)
        if self.budgets is not None and key.budget_usd is not None:
            try:
                reservation = await self.budgets.reserve(
                    key.id,
                    key.budget_usd,
                    key.budget_period or "month",
                    self.max_cost(entry, max_input_tokens, max_output_tokens),
                )
            except BaseException:
                if admission is not None:
                    await admission.done(0)
                raise
        return Metered(principal, entry, task, route, request_id, admission, reservation)

    async def finish(self, metered: Metered, status: int) -> None:
        """Settle the reservation with the real cost, release the rate-limit slot, write the ledger
        row. Failed requests cost nothing. Idempotent."""
        if metered.finished:
            return
        metered.finished = True
        # Failed requests cost nothing; a request the caller abandoned (499, a closed stream) pays for
        # what it consumed up to then.
        metered.cost_usd = metered.cost_of() if status < 400 or status == 499 else 0.0
        try:
            if metered.reservation is not None:
                await self.budgets.settle(metered.reservation, metered.cost_usd)
        except Exception:  # on the way out: a store outage must not replace the response
            log.exception("could not settle the budget hold of request %s", metered.request_id)
        finally:
            try:
                if metered.admission is not None:
                    await metered.admission.done(metered.input_tokens + metered.output_tokens)  # never raises
            finally:
                if self.ledger is not None:
                    self.ledger.record(self._record(metered, status))

    @staticmethod
    def _record(m: Metered, status: int) -> UsageRecord:
        span = trace.get_current_span().get_span_context()
        return UsageRecord(
            request_id=m.request_id,
            key_id=m.principal.key_id or None,
            model=m.entry.id,
            task=m.task,
            provider="local",
            input_tokens=m.input_tokens,
            output_tokens=m.output_tokens,
            items=m.items,
            compute_s=round(m.compute_s, 6),
            cost_usd=m.cost_usd,
            status=status,
            latency_s=round(time.perf_counter() - m.started, 6),
            trace_id=format(span.trace_id, "032x") if span.is_valid else None,
            time=m.time,
            route=m.route,
        )

    @contextlib.asynccontextmanager
    async def track(self, metered: Metered):
        """Finish `metered` with the status the block ended in (a MeshError's, 499 if the caller
        went away, 500 for anything else); the finish itself cannot be cancelled (it is shielded
        when it awaits a store or the caller is already gone)."""
        status = 500
        try:
            yield metered
            status = 200
        except MeshError as err:
            status = err.code.http_status
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away (a closed stream)
            status = 499
            raise
        finally:
            if self._finish_awaits or status == 499:
                await asyncio.shield(self.finish(metered, status))
            else:  # nothing in it can be interrupted: no task for a shield
                await self.finish(metered, status)

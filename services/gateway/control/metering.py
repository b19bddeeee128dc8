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
import logging
import time
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from meshserve.tasks.v1 import tasks_pb2

from services.common import caps, tracing
from services.common.catalog import ModelEntry
from services.common.errors import MeshError
from services.gateway.control import redis_steps
from services.gateway.control.auth import Principal
from services.gateway.control.ratelimit import store_errors
from services.gateway.ledger import UsageLedger

if TYPE_CHECKING:
    from services.gateway.control.budgets import BudgetBook, Reservation
    from services.gateway.control.ratelimit import Admission, KeyLimits, LocalAdmission, RateLimiter

log = logging.getLogger(__name__)


def text_token_bound(entry: ModelEntry, texts) -> int:
    """Most tokens these texts can be encoded to (see the module docstring)."""
    limit = entry.preprocess.max_length
    return sum(min(limit, len(t.encode()) + 2) for t in texts)


def zero_shot_token_bound(entry: ModelEntry, texts, labels, template: str | None) -> int:
    """Most tokens of a zero-shot request: each text, and per text one hypothesis per label (the
    template with the label in place of its one `{}`). Arithmetic on the UTF-8 lengths: no
    hypothesis is built (a list of them costs labels x template bytes, here before admission)."""
    limit = entry.preprocess.max_length
    template = template or entry.postprocess.zero_shot.hypothesis_template
    around = len(template.encode())  # the template less its `{}` (2 bytes), plus 2 special tokens
    per_text = sum(min(limit, around + len(label.encode())) for label in labels)
    return text_token_bound(entry, texts) + len(texts) * per_text


def token_bound(entry: ModelEntry, inputs: tasks_pb2.TaskInputs, parameters: tasks_pb2.TaskParameters) -> int:
    """Most input tokens of a task request, after refusing it if it is over an input cap
    (caps.check_task_inputs: counts, lengths, image headers), on REST and gRPC alike."""
    caps.check_task_inputs(entry, inputs, parameters)
    kind = inputs.WhichOneof("kind")
    if kind == "text":
        texts = inputs.text.texts
        if parameters.candidate_labels:  # zero-shot: each text and one hypothesis per label
            return zero_shot_token_bound(entry, texts, parameters.candidate_labels, parameters.hypothesis_template)
        return text_token_bound(entry, texts)
    if kind == "sentence_similarity":
        sim = inputs.sentence_similarity
        return text_token_bound(entry, [sim.source_sentence, *sim.sentences])
    return 0  # images: no tokens


class Metered:
    """One admitted request, from admission to its ledger row."""

    __slots__ = (
        "admission",
        "client_request_id",
        "compute_s",
        "cost_usd",
        "entry",
        "finished",
        "input_tokens",
        "items",
        "output_tokens",
        "principal",
        "request_id",
        "reservation",
        "route",
        "started",
        "task",
        "time",
    )

    def __init__(
        self,
        principal: Principal,
        entry: ModelEntry,
        task: str,
        route: str,
        request_id: str,
        admission: Admission | LocalAdmission | None,
        reservation: Reservation | None,
        *,
        finished: bool = False,
        client_request_id: str | None = None,
    ) -> None:
        self.principal = principal
        self.client_request_id = client_request_id  # the caller's X-Request-Id (request_id is ours)
        self.entry = entry
        self.task = task
        self.route = route
        self.request_id = request_id
        self.admission = admission
        self.reservation = reservation
        self.started = time.perf_counter()
        self.time = time.time()  # when the request started (unix s; the ledger row's `time`)
        self.input_tokens = 0
        self.output_tokens = 0
        self.items = 0
        self.compute_s = 0.0
        self.cost_usd = 0.0
        self.finished = finished

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
        headers = {
            "X-Usage-Input-Tokens": str(self.input_tokens),
            "X-Usage-Output-Tokens": str(self.output_tokens),
            "X-Usage-Cost-USD": f"{self.cost_of():.9f}",
        }
        if self.admission is not None:
            headers.update(self.admission.headers)
        return headers

    def cost_of(self) -> float:
        return self.entry.pricing.cost(self.input_tokens, self.output_tokens, self.compute_s)


class Metering:
    def __init__(
        self,
        limiter: RateLimiter | None,
        budgets: BudgetBook | None,
        ledger: UsageLedger | None,
        *,
        timeout_s: float,
        redis: aioredis.Redis | None = None,
    ) -> None:
        """`redis`: the client the limiter and the budget book share, when both are in Redis:
        their steps of a phase then go in one round trip, with those of concurrent requests
        (redis_steps.Batcher)."""
        self.limiter = limiter
        self.budgets = budgets
        self.ledger = ledger
        self.timeout_s = timeout_s
        # Whether finishing awaits a store (Redis); in process it completes without suspending.
        self._finish_awaits = any(part is not None and part.remote for part in (limiter, budgets))
        self._redis = (
            redis if limiter is not None and limiter.remote and budgets is not None and budgets.remote else None
        )
        self._steps = redis_steps.Batcher(self._redis) if self._redis is not None else None

    def _record_refusal(
        self, principal, entry, task, route, request_id, err: MeshError, client_request_id: str | None = None
    ) -> None:
        """A refused request's ledger row: its status, no cost."""
        if self.ledger is not None:
            refused = Metered(principal, entry, task, route, request_id, None, None, finished=True)
            refused.client_request_id = client_request_id
            self.ledger.append(self._row(refused, err.code.http_status))

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
    ) -> Metered:
        """Key restrictions, then rate limits, then the budget reservation; raises the refusal
        (which gets its own ledger row, with its status and no cost).

        In process the stores' synchronous `*_now` forms decide without a coroutine (the cached
        path pays for every Python call here): the limiter's admits or refuses, the budget's
        reserves or answers None (nothing held) and the awaited form raises the refusal. With
        Redis they answer None: the two steps go together in one round trip when the limiter and
        the budget book share a client, else the awaited forms decide one after the other."""
        key = principal.key
        admission = reservation = None
        try:
            if key.models or key.tasks:
                principal.allow(entry.id, task)
            limits = principal.limits
            # The tokens-per-minute room to look for: an estimate (the window charges the real
            # count afterwards); by default the bound the budget holds.
            hint = max_input_tokens + max_output_tokens if tokens_hint is None else tokens_hint
            budgeted = self.budgets is not None and key.budget_usd is not None
            # The most it can cost: every token it may read and write, computing until its deadline.
            amount = entry.pricing.cost(max_input_tokens, max_output_tokens, self.timeout_s) if budgeted else 0.0
            period = key.budget_period or "month"
            if self._steps is not None:
                if limits is not None or budgeted:
                    admission, reservation = await self._admit_together(
                        key, limits, hint, period, amount if budgeted else None
                    )
            else:
                if self.limiter is not None and limits is not None:
                    admission = self.limiter.admit_now(key.id, limits, hint) or await self.limiter.admit(
                        key.id, limits, tokens_hint=hint
                    )
                if budgeted:
                    reservation = self.budgets.reserve_now(
                        key.id, key.budget_usd, period, amount
                    ) or await self.budgets.reserve(key.id, key.budget_usd, period, amount)
        except BaseException as err:  # refused after the limiter admitted (the budget): not counted
            if admission is not None and not admission.refund_now():
                await admission.refund()
            if isinstance(err, MeshError):
                self._record_refusal(principal, entry, task, route, request_id, err, client_request_id)
            raise
        return Metered(
            principal, entry, task, route, request_id, admission, reservation, client_request_id=client_request_id
        )

    async def _admit_together(
        self, key, limits: KeyLimits | None, hint: int, period: str, amount: float | None
    ) -> tuple[Admission | None, Reservation | None]:
        """The limiter's and the budget's admission steps (`limits` None: no limiter step; `amount`
        None: no budget step) in one Redis round trip, shared with concurrent requests; whichever
        went through is undone when the other refused (the limiter's refusal is the one raised, as
        when they run one after the other)."""
        steps, deciders = [], []
        if limits is not None:
            step, admitted = self.limiter.admit_step(key.id, limits, tokens_hint=hint)
            steps.append(step)
            deciders.append((admitted, "rate-limit"))
        if amount is not None:
            step, reserved = self.budgets.reserve_step(key.id, key.budget_usd, period, amount)
            steps.append(step)
            deciders.append((reserved, "budget"))
        with store_errors(deciders[0][1]):
            replies = await self._steps.run(steps)
        results: list = []
        for (decide, what), reply in zip(deciders, replies, strict=True):
            try:
                with store_errors(what):
                    if isinstance(reply, Exception):
                        raise reply
                    results.append(decide(reply))
            except MeshError as err:
                results.append(err)
        admission = results[0] if limits is not None else None
        reservation = results[-1] if amount is not None else None
        refusal = next((r for r in results if isinstance(r, MeshError)), None)
        if refusal is None:
            return admission, reservation
        if admission is not None and not isinstance(admission, MeshError):
            await admission.refund()  # never raises
        if reservation is not None and not isinstance(reservation, MeshError):
            try:
                await self.budgets.settle(reservation, 0.0)
            except MeshError:  # left to its lease, then charged in full: say so
                log.exception("could not release the budget hold of a refused request of key %s", key.id)
        raise refusal

    async def _finish_together(
        self, metered: Metered, reservation: Reservation | None, admission: Admission | None
    ) -> None:
        """Settle and release in one Redis round trip, shared with concurrent requests (never raises)."""
        steps = []
        if reservation is not None:
            steps.append(self.budgets.settle_step(reservation, metered.cost_usd))
        done = admission.done_step(metered.input_tokens + metered.output_tokens) if admission is not None else None
        if done is not None:
            steps.append(done)
        if not steps:
            return
        try:
            replies = await self._steps.run(steps)
        except aioredis.RedisError:
            log.exception("could not settle or release request %s", metered.request_id)
            return
        for reply in replies:
            if isinstance(reply, Exception):
                log.error("could not settle or release request %s: %r", metered.request_id, reply)

    async def finish(self, metered: Metered, status: int) -> None:
        """Settle the reservation with the real cost, release the rate-limit slot, write the ledger
        row. Failed requests cost nothing. Idempotent; never raises."""
        if metered.finished:
            return
        metered.finished = True
        reservation, admission = metered.reservation, metered.admission
        try:
            # Failed requests cost nothing; a request the caller abandoned (499, a closed stream)
            # pays for what it consumed up to then.
            metered.cost_usd = metered.cost_of() if status < 400 or status == 499 else 0.0
            if self._steps is not None:
                await self._finish_together(metered, reservation, admission)
                admission = None  # released there too
            elif reservation is not None and not self.budgets.settle_now(reservation, metered.cost_usd):
                await self.budgets.settle(reservation, metered.cost_usd)
        except Exception:  # on the way out: a store outage must not replace the response
            log.exception("could not settle the budget hold of request %s", metered.request_id)
        finally:
            try:
                if admission is not None:
                    tokens = metered.input_tokens + metered.output_tokens
                    if not admission.done_now(tokens):
                        await admission.done(tokens)  # never raises
            except Exception:
                log.exception("could not release the rate-limit state of request %s", metered.request_id)
            finally:
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
            "local",
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
        if metering._finish_awaits or status == 499:
            await asyncio.shield(metering.finish(self._metered, status))
        else:  # nothing in it can be interrupted: no task for a shield
            await metering.finish(self._metered, status)
        return False

    async def fail(self, exc: BaseException) -> None:
        """Finish the request as failed by `exc` (work after admission that raised outside the
        `async with`, e.g. tokenizing a prompt before its stream starts)."""
        await self.__aexit__(type(exc), exc, exc.__traceback__)

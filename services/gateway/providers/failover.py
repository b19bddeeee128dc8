"""The attempt loop: try a selection's candidates in order with full-jitter backoff, Retry-After
cooldowns, breakers and gates, within an attempt count and a time budget; one span per attempt.
A caller's error (a non-retryable 4xx) ends the loop at once; an explicit provider is retried only
on itself. Only provider faults (UpstreamError, the mesh's server-fault MeshErrors, timeouts,
connection errors) are retried; anything else is a gateway bug and goes up at once. The request's
own time running out is no provider's fault: no breaker verdict, no error sample."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
from opentelemetry import trace

from services.common.errors import ErrorCode, MeshError
from services.gateway.providers.breaker import Breakers, Ticket
from services.gateway.providers.config import RoutingSpec
from services.gateway.providers.gate import ProviderGates
from services.gateway.providers.registry import ProviderRegistry, Selection
from services.gateway.providers.stats import ATTEMPTS, FAILOVERS, ProviderStats
from services.gateway.providers.types import Attempt, Candidate, UpstreamError

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("meshserve")

T = TypeVar("T")

# A non-retryable upstream status -> the code the caller gets (other 4xx: INVALID_INPUT).
_CLIENT_CODES = {
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    501: ErrorCode.NOT_IMPLEMENTED,
}
_GENERATION_OPS = frozenset({"chat", "completion"})


def client_error(err: UpstreamError) -> MeshError:
    """The caller's own error as an upstream reported it (its message kept)."""
    code = _CLIENT_CODES.get(err.status)
    if err.status == 424:  # the upstream's backend failed (TGI/TEI): never the caller's error
        code = ErrorCode.UPSTREAM_UNAVAILABLE
    if code is None:
        code = ErrorCode.INVALID_INPUT if 400 <= err.status < 500 else ErrorCode.UPSTREAM_UNAVAILABLE
    return MeshError(code, err.message)


_CONNECTION_ERRORS = (OSError, aiohttp.ClientError)  # ConnectionError is an OSError


def _as_upstream_error(exc: Exception) -> UpstreamError | MeshError | None:
    """What a call raised, as an UpstreamError (retryable or not), a caller's MeshError to re-raise,
    or None: no provider fault (a gateway bug), to re-raise as it is."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, MeshError):
        # The local mesh's own errors: its outages fail over, the caller's mistakes go back as they are.
        if exc.code.server_fault:
            timeout = exc.code is ErrorCode.DEADLINE_EXCEEDED
            return UpstreamError(exc.message, status=exc.code.http_status, retryable=True, timeout=timeout)
        return exc
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError
        return UpstreamError("timed out", status=0, retryable=True, timeout=True)
    if isinstance(exc, _CONNECTION_ERRORS):
        return UpstreamError(f"connection failed: {type(exc).__name__}: {exc}", status=0, retryable=True)
    return None


class _Loop:
    """One request's attempts: which candidate next, and the verdict of each try."""

    def __init__(self, selection: Selection, routing: RoutingSpec, end: float, registry: ProviderRegistry,
                 breakers: Breakers, gates: ProviderGates) -> None:  # fmt: skip
        self.selection = selection
        self.routing = routing
        self.end = end
        self.registry = registry
        self.breakers = breakers
        self.gates = gates
        self.next = 0  # rotation pointer into the candidates
        self.attempts: list[Attempt] = []
        self.errors: list[tuple[str, UpstreamError]] = []
        self.skipped: list[str] = []

    def _rotation(self) -> list[Candidate]:
        cands = self.selection.candidates
        n = len(cands)
        return [cands[(self.next + i) % n] for i in range(n)]

    def take(self, c: Candidate, *, force: bool) -> Ticket | None:
        """Take the breaker's and the gate's permission for an attempt at `c`: the breaker's ticket."""
        ticket = self.breakers.allow(c.provider, c.model_id)
        if ticket is None:
            return None
        if self.gates.try_enter(c.provider):
            return ticket
        if force:
            self.gates.force_enter(c.provider)
            return ticket
        self.breakers.release(c.provider, c.model_id, ticket)
        return None

    def choose(self) -> tuple[Candidate | None, float, Ticket | None]:
        """The next candidate and how long to wait for it first (a cooled last resort)."""
        rotation = self._rotation()
        now = time.monotonic()
        for force in (False, True):  # healthy ones first; then saturated gates, as a last resort
            for c in rotation:
                if self.registry.cooled_for(c.provider, c.model_id, now) > 0:
                    continue
                if (ticket := self.take(c, force=force)) is not None:
                    self.next = (self.selection.candidates.index(c) + 1) % len(self.selection.candidates)
                    return c, 0.0, ticket
        # Only cooled ones left: wait for the soonest if that fits the budget (an open breaker never).
        waits = [
            (self.registry.cooled_for(c.provider, c.model_id, now), c)
            for c in rotation
            if not self.breakers.refuses(c.provider, c.model_id)
        ]
        waits = [(w, c) for w, c in waits if w > 0 and now + w < self.end]
        if not waits:
            return None, 0.0, None
        wait, c = min(waits, key=lambda item: item[0])
        return c, wait, None

    def backoff(self, k: int) -> float:
        """Full jitter before attempt k >= 2, never past the budget."""
        r = self.routing
        delay = random.uniform(0.0, min(r.backoff_max_s, r.backoff_base_s * 2 ** (k - 2)))
        return min(delay, max(0.0, self.end - time.monotonic()))

    def verdict(self, c: Candidate, err: UpstreamError, ticket: Ticket) -> None:
        """A retryable failure: cool the provider on a usable Retry-After, count a breaker failure
        unless it was a 429 that said when to come back; a Retry-After beyond max_retry_after_s
        says it is down: its breaker opens (for open_s, then half-open probes)."""
        cooled = err.retry_after is not None and err.retry_after <= self.routing.max_retry_after_s
        if cooled:
            self.registry.cool(c.provider, c.model_id, time.monotonic() + err.retry_after)
        if cooled and err.status == 429:
            self.breakers.release(c.provider, c.model_id, ticket)
        else:
            down = err.retry_after is not None and not cooled
            self.breakers.failure(c.provider, c.model_id, ticket, down=down)
        self.errors.append((c.provider, err))


_counters: dict[tuple[str, str, str], object] = {}


def _count(attempts: list[Attempt], model: str) -> None:
    for a in attempts:
        key = (a.provider, model, a.outcome)
        child = _counters.get(key)
        if child is None:
            child = _counters[key] = ATTEMPTS.labels(*key)
        child.inc()


def _describe(err: UpstreamError) -> str:
    text = err.message if len(err.message) <= 200 else err.message[:197] + "..."
    return f"{err.status} {text}" if err.status else text


def _final_error(loop: _Loop) -> MeshError:
    """The request's failure after the loop: from the failures seen, or why nothing was tried."""
    selection, errors = loop.selection, loop.errors
    if not errors:
        if time.monotonic() >= loop.end:
            return MeshError(
                ErrorCode.DEADLINE_EXCEEDED, f"no time left to try the providers of {selection.model_id!r}"
            )
        names = ", ".join(c.provider for c in selection.candidates)
        waits = [loop.breakers.retry_in(c.provider, c.model_id) for c in selection.candidates]
        waits += [loop.registry.cooled_for(c.provider, c.model_id) for c in selection.candidates]
        retry = min((w for w in waits if w > 0), default=None)
        return MeshError(
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"no provider of model {selection.model_id!r} is available now ({names}: circuit open or cooling)",
            retry_after_s=retry,
        )
    message = f"all {len(errors)} attempts failed: " + ", ".join(f"{p}: {_describe(e)}" for p, e in errors)
    if all(e.status == 429 for _p, e in errors):
        retry = min((e.retry_after for _p, e in errors if e.retry_after is not None), default=None)
        return MeshError(ErrorCode.RATE_LIMITED, message, retry_after_s=retry)
    if errors[-1][1].timeout:
        return MeshError(ErrorCode.DEADLINE_EXCEEDED, message)
    if all(e.status in (401, 403) for _p, e in errors):
        names = ", ".join(dict.fromkeys(p for p, _e in errors))
        err = MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, f"{names}: the provider refused the gateway's credentials "
                        f"(check its api_key_env); {message}")  # fmt: skip
        err.retry_after_s = None  # a retry soon will not help: the provider is misconfigured
        return err
    return MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, message)


def _no_verdict(loop: _Loop, c: Candidate, ticket: Ticket, span, attempt: Attempt) -> None:
    """An attempt that ends the request without judging the provider: its probe slot back."""
    loop.breakers.release(c.provider, c.model_id, ticket)
    loop.attempts.append(attempt)
    span.set_attributes({"meshserve.outcome": attempt.outcome, "http.response.status_code": attempt.status})


def _failed(loop: _Loop, c: Candidate, ticket: Ticket, exc: Exception, latency: float, expired: bool,
            stats: ProviderStats, span) -> bool:  # fmt: skip
    """Judge a failed attempt: False to move on (a retryable provider failure), True to re-raise
    `exc` as it is (no provider fault: a gateway bug); raises the caller's error, or
    DEADLINE_EXCEEDED when the request's own time ran out (no breaker verdict, no error sample)."""
    err = _as_upstream_error(exc)
    if expired or (isinstance(err, UpstreamError) and err.timeout and time.monotonic() >= loop.end):
        _no_verdict(loop, c, ticket, span, Attempt(c.provider, "failed", 504, latency, "out of time"))
        earlier = "; earlier: " + ", ".join(f"{p}: {_describe(e)}" for p, e in loop.errors) if loop.errors else ""
        raise MeshError(ErrorCode.DEADLINE_EXCEEDED,
                        f"the request's time ran out waiting for provider {c.provider!r}{earlier}") from None  # fmt: skip
    if err is None:
        log.warning("provider %s: the call failed with a gateway error", c.provider, exc_info=exc)
        _no_verdict(loop, c, ticket, span, Attempt(c.provider, "failed", 500, latency, type(exc).__name__))
        return True
    if isinstance(err, MeshError) or not err.retryable:
        mesh = err if isinstance(err, MeshError) else client_error(err)
        status = err.code.http_status if isinstance(err, MeshError) else err.status
        _no_verdict(loop, c, ticket, span, Attempt(c.provider, "client_error", status, latency, mesh.message))
        raise mesh from None
    stats.record(c.provider, c.model_id, ok=False, latency_s=latency)
    loop.verdict(c, err, ticket)
    loop.attempts.append(Attempt(c.provider, "retried", err.status, latency, _describe(err)))
    span.set_attributes({"meshserve.outcome": "retried", "http.response.status_code": err.status})
    span.set_status(trace.StatusCode.ERROR, _describe(err))
    return False


def _noop() -> None:
    return None


def _leaver(gates: ProviderGates, provider: str) -> Callable[[], None]:
    """Leave `provider`'s gate once, however often it is called (a held stream's end)."""
    if not gates.gated(provider):
        return _noop
    left = False

    def leave() -> None:
        nonlocal left
        if not left:
            left = True
            gates.leave(provider)

    return leave


async def _attempt(loop: _Loop, c: Candidate, ticket: Ticket, call: Callable[[Candidate], Awaitable[T]], k: int,
                   stats: ProviderStats, op: str, hold: bool) -> tuple[bool, T | None]:  # fmt: skip
    """One try of `c` under its span: (True, result), or (False, None) after a retryable failure.
    The caller's own errors are raised. `hold`: a success keeps its gate slot (attempt_each's leave)."""
    attributes = {"meshserve.provider": c.provider, "meshserve.model": c.model_id, "meshserve.attempt": k}
    t0 = time.monotonic()
    with _tracer.start_as_current_span("provider.attempt", attributes=attributes) as span:
        try:
            async with asyncio.timeout(loop.end - t0) as scope:
                result = await call(c)
        except Exception as exc:  # every failure is classified: retried, the caller's own, or a bug
            loop.gates.leave(c.provider)
            latency = time.monotonic() - t0
            if _failed(loop, c, ticket, exc, latency, scope.expired(), stats, span):
                raise
            return False, None
        except BaseException:  # cancelled (or the process stopping): no verdict, the slots back
            loop.gates.leave(c.provider)
            loop.breakers.release(c.provider, c.model_id, ticket)
            raise
        if not hold:
            loop.gates.leave(c.provider)
        latency = time.monotonic() - t0
        stats.record(
            c.provider, c.model_id, ok=True, latency_s=latency, ttft_s=latency if op in _GENERATION_OPS else None
        )
        loop.breakers.success(c.provider, c.model_id, ticket)
        loop.attempts.append(Attempt(c.provider, "ok", 200, latency))
        span.set_attributes({"meshserve.outcome": "ok", "http.response.status_code": 200})
        return True, result


async def attempt_each(
    selection: Selection,
    call: Callable[[Candidate], Awaitable[T]],
    *,
    routing: RoutingSpec,
    deadline: float,
    registry: ProviderRegistry,
    stats: ProviderStats,
    breakers: Breakers,
    gates: ProviderGates,
    op: str,
    hold: bool = False,
) -> tuple[T, Candidate, list[Attempt]] | tuple[T, Candidate, list[Attempt], Callable[[], None]]:
    """Try the candidates until one answers: (its result, the candidate, every attempt). `deadline`
    is the request's time.monotonic() deadline; the loop ends by min(deadline, now + budget_s).
    `hold=True` (a stream): the answering provider's gate slot stays taken and a fourth item,
    `leave()`, frees it (call it when the stream ends; idempotent).
    Raises MeshError: the caller's own error at once, else the last failures' summary; an
    exception that is no provider's fault (a gateway bug) as it is."""
    end = min(deadline, time.monotonic() + routing.budget_s)
    loop = _Loop(selection, routing, end, registry, breakers, gates)
    try:
        for k in range(1, routing.max_attempts + 1):
            if k > 1 and (delay := loop.backoff(k)) > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= end:
                break
            c, wait, ticket = loop.choose()
            if c is None:
                break
            if wait > 0:
                await asyncio.sleep(wait)
                if (ticket := loop.take(c, force=True)) is None:
                    continue
            ok, result = await _attempt(loop, c, ticket, call, k, stats, op, hold)  # type: ignore[arg-type]
            if ok:
                if c != selection.candidates[0]:
                    FAILOVERS.labels(selection.model_id).inc()
                if hold:
                    return result, c, loop.attempts, _leaver(gates, c.provider)
                return result, c, loop.attempts
        if loop.attempts:
            loop.attempts[-1].outcome = "failed"
        raise _final_error(loop)
    finally:
        _count(loop.attempts, selection.model_id)

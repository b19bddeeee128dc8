"""Circuit breakers per provider x model: closed -> open after consecutive failures -> half-open
after `open_s` (a few probes through) -> closed on a success, open again on a failure.

Hand-written rather than pybreaker / aiobreaker: we key breakers by provider x model, need
half-open probe slots that an attempt without a verdict (cancelled, the caller's own error) gives
back, and export state and transitions as metrics; pybreaker is sync-first and aiobreaker is
unmaintained.

allow() hands out a Ticket (None: refused) that success() / failure() / release() take back: only a
probe ticket of the current half-open round touches the probe count, so an attempt that started
while the breaker was closed (or in an older round) never frees a probe slot it did not take."""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge

from services.gateway.providers.config import BreakerSpec

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_GAUGE_VALUE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}

STATE = Gauge(
    "meshserve_provider_breaker_state",
    "Circuit breaker of a provider x model: 0 closed, 1 open, 2 half_open.",
    ["provider", "model"],
)
TRANSITIONS = Counter(
    "meshserve_provider_breaker_transitions_total",
    "Circuit breaker transitions by the state entered.",
    ["provider", "model", "to"],
)


class Ticket:
    """An attempt's permission: a probe of half-open round `epoch`, or a plain (closed) attempt."""

    __slots__ = ("epoch", "probe")

    def __init__(self, probe: bool, epoch: int) -> None:
        self.probe = probe
        self.epoch = epoch


CLOSED_TICKET = Ticket(False, 0)  # every attempt at a closed breaker: no allocation on the hot path


class _Breaker:
    __slots__ = ("epoch", "failures", "opened_at", "probes", "state")

    def __init__(self) -> None:
        self.state = CLOSED
        self.failures = 0  # consecutive
        self.opened_at = 0.0
        self.probes = 0  # half-open probes in flight
        self.epoch = 0  # half-open rounds so far (a probe ticket belongs to one)


class Breakers:
    """All breakers; a key without failures has no entry (allow() is one dict lookup)."""

    def __init__(self, spec: BreakerSpec) -> None:
        self.spec = spec
        self._breakers: dict[tuple[str, str], _Breaker] = {}

    def _move(self, provider: str, model: str, breaker: _Breaker, to: str) -> None:
        breaker.state = to
        STATE.labels(provider, model).set(_GAUGE_VALUE[to])
        TRANSITIONS.labels(provider, model, to).inc()
        level = logging.WARNING if to == OPEN else logging.INFO
        log.log(level, "provider %s model %s: circuit breaker %s", provider, model, to)

    def _current(self, provider: str, model: str, breaker: _Breaker) -> str:
        """The state, moving open -> half_open once open_s has passed."""
        if breaker.state == OPEN and time.monotonic() - breaker.opened_at >= self.spec.open_s:
            breaker.probes = 0
            breaker.epoch += 1
            self._move(provider, model, breaker, HALF_OPEN)
        return breaker.state

    def allow(self, provider: str, model: str) -> Ticket | None:
        """May an attempt go to this provider x model now? A ticket, or None (refused). A half-open
        breaker hands out at most half_open_probes probe tickets; every ticket ends with success(),
        failure() or release()."""
        breaker = self._breakers.get((provider, model))
        if breaker is None:
            return CLOSED_TICKET
        state = self._current(provider, model, breaker)
        if state == CLOSED:
            return CLOSED_TICKET
        if state == HALF_OPEN and breaker.probes < self.spec.half_open_probes:
            breaker.probes += 1
            return Ticket(True, breaker.epoch)
        return None

    def _give_back(self, breaker: _Breaker, ticket: Ticket | None) -> None:
        """A probe of the current half-open round ended: its slot is free."""
        if ticket is not None and ticket.probe and ticket.epoch == breaker.epoch and breaker.state == HALF_OPEN:
            breaker.probes = max(0, breaker.probes - 1)

    def refuses(self, provider: str, model: str) -> bool:
        """Would allow() say no (without taking a probe slot)?"""
        breaker = self._breakers.get((provider, model))
        if breaker is None:
            return False
        state = self._current(provider, model, breaker)
        return state == OPEN or (state == HALF_OPEN and breaker.probes >= self.spec.half_open_probes)

    def success(self, provider: str, model: str, ticket: Ticket | None = None) -> None:
        breaker = self._breakers.get((provider, model))
        if breaker is None:
            return
        self._give_back(breaker, ticket)
        breaker.failures = 0
        if breaker.state != CLOSED:
            breaker.probes = 0
            self._move(provider, model, breaker, CLOSED)

    def failure(self, provider: str, model: str, ticket: Ticket | None = None, *, down: bool = False) -> None:
        """A failed attempt (`ticket`: its allow(); None for a failure seen outside an attempt, e.g.
        mid-stream). `down`: the provider said it is down for long (a Retry-After beyond
        max_retry_after_s): open now, whatever the count."""
        breaker = self._breakers.get((provider, model))
        if breaker is None:
            breaker = self._breakers[(provider, model)] = _Breaker()
        self._give_back(breaker, ticket)
        breaker.failures += 1
        if down or breaker.state == HALF_OPEN or (breaker.state == CLOSED and breaker.failures >= self.spec.failures):
            breaker.opened_at = time.monotonic()
            breaker.probes = 0
            if breaker.state != OPEN:
                self._move(provider, model, breaker, OPEN)

    def release(self, provider: str, model: str, ticket: Ticket | None) -> None:
        """An attempt that ended without a verdict (cancelled, the caller's error): frees its probe
        slot when `ticket` is a probe of the current half-open round (else nothing changes)."""
        breaker = self._breakers.get((provider, model))
        if breaker is not None:
            self._give_back(breaker, ticket)

    def state(self, provider: str, model: str) -> str:
        breaker = self._breakers.get((provider, model))
        return CLOSED if breaker is None else self._current(provider, model, breaker)

    def retry_in(self, provider: str, model: str) -> float:
        """Seconds until an open breaker lets a probe through (0 when it is not open)."""
        breaker = self._breakers.get((provider, model))
        if breaker is None or self._current(provider, model, breaker) != OPEN:
            return 0.0
        return max(0.0, breaker.opened_at + self.spec.open_s - time.monotonic())

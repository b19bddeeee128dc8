"""Per-provider admission: at most max_concurrency attempts in flight and rpm attempts in any
sliding 60 s window. The local provider is never gated here (the mesh has its own admission)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from prometheus_client import Counter, Gauge

from services.gateway.providers.config import ProviderSpec

WINDOW_S = 60.0

IN_FLIGHT = Gauge("meshserve_provider_in_flight", "Attempts in flight at a remote provider.", ["provider"])
GATED = Counter(
    "meshserve_provider_gated_total",
    "Attempts a provider's gate held back, by reason (concurrency | rpm).",
    ["provider", "reason"],
)


class _Gate:
    __slots__ = ("by_concurrency", "by_rpm", "gauge", "in_flight", "max_concurrency", "rpm", "sent")

    def __init__(self, spec: ProviderSpec) -> None:
        self.max_concurrency = spec.max_concurrency
        self.rpm = spec.rpm
        self.in_flight = 0
        self.sent: deque[float] = deque()  # monotonic times of the attempts in the rpm window
        self.gauge = IN_FLIGHT.labels(spec.name)
        self.by_concurrency = GATED.labels(spec.name, "concurrency")
        self.by_rpm = GATED.labels(spec.name, "rpm")

    def full(self, now: float) -> str | None:
        """Why no attempt may enter now (concurrency | rpm), or None."""
        if self.in_flight >= self.max_concurrency:
            return "concurrency"
        if self.rpm is not None:
            sent, horizon = self.sent, now - WINDOW_S
            while sent and sent[0] <= horizon:
                sent.popleft()
            if len(sent) >= self.rpm:
                return "rpm"
        return None

    def enter(self, now: float) -> None:
        self.in_flight += 1
        if self.rpm is not None:
            self.sent.append(now)
        self.gauge.set(self.in_flight)


class ProviderGates:
    """The gates of the remote providers; names without a gate (local, unknown) always pass."""

    def __init__(self, specs: Iterable[ProviderSpec]) -> None:
        self._gates = {spec.name: _Gate(spec) for spec in specs if spec.kind != "local"}

    def try_enter(self, provider: str) -> bool:
        gate = self._gates.get(provider)
        if gate is None:
            return True
        now = time.monotonic()
        reason = gate.full(now)
        if reason is not None:
            (gate.by_concurrency if reason == "concurrency" else gate.by_rpm).inc()
            return False
        gate.enter(now)
        return True

    def force_enter(self, provider: str) -> None:
        """Enter past a full gate: the last candidate left is tried anyway (then leave() as usual)."""
        gate = self._gates.get(provider)
        if gate is not None:
            gate.enter(time.monotonic())

    def leave(self, provider: str) -> None:
        gate = self._gates.get(provider)
        if gate is not None and gate.in_flight > 0:
            gate.in_flight -= 1
            gate.gauge.set(gate.in_flight)

    def gated(self, provider: str) -> bool:
        """Is this provider gated at all (a remote provider with a limit)?"""
        return provider in self._gates

    def saturated(self, provider: str) -> bool:
        gate = self._gates.get(provider)
        return gate is not None and gate.full(time.monotonic()) is not None

    def in_flight(self, provider: str) -> int:
        gate = self._gates.get(provider)
        return 0 if gate is None else gate.in_flight

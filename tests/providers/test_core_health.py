"""Circuit breakers (closed -> open -> half-open -> closed / open again) and provider gates."""

from __future__ import annotations

import time

from services.gateway.providers.breaker import Breakers
from services.gateway.providers.config import BreakerSpec, ProviderSpec
from services.gateway.providers.gate import ProviderGates

P, M = "mesh-b", "acme/chat"


def _wait_half_open(breakers: Breakers, bound_s: float = 5.0) -> None:
    stop = time.monotonic() + bound_s
    while breakers.state(P, M) != "half_open":
        assert time.monotonic() < stop, "breaker never went half-open"
        time.sleep(0.005)


def test_breaker_opens_after_consecutive_failures_only():
    b = Breakers(BreakerSpec(failures=3, open_s=30))
    b.failure(P, M)
    b.failure(P, M)
    b.success(P, M)  # resets the count
    b.failure(P, M)
    b.failure(P, M)
    assert b.state(P, M) == "closed" and b.allow(P, M)
    b.failure(P, M)
    assert b.state(P, M) == "open" and not b.allow(P, M) and b.refuses(P, M)
    assert b.retry_in(P, M) > 0
    assert b.allow("other", M)  # per provider x model


def test_half_open_probe_closes_or_reopens():
    b = Breakers(BreakerSpec(failures=1, open_s=0.02, half_open_probes=1))
    b.failure(P, M)
    _wait_half_open(b)
    probe = b.allow(P, M)
    assert probe is not None and probe.probe  # the probe
    assert b.allow(P, M) is None  # only one at a time
    b.release(P, M, probe)  # the probe ended without a verdict: its slot is free again
    probe = b.allow(P, M)
    assert probe is not None
    b.failure(P, M, probe)
    assert b.state(P, M) == "open"
    _wait_half_open(b)
    probe = b.allow(P, M)
    assert probe is not None
    b.success(P, M, probe)
    assert b.state(P, M) == "closed" and b.allow(P, M) and b.allow(P, M)


def test_only_a_current_probe_frees_a_probe_slot():
    b = Breakers(BreakerSpec(failures=1, open_s=0.02, half_open_probes=1))
    plain = b.allow(P, M)  # taken while closed: no probe
    assert plain is not None and not plain.probe
    b.failure(P, M)
    _wait_half_open(b)
    old_probe = b.allow(P, M)
    assert old_probe is not None and old_probe.probe
    b.failure(P, M, old_probe)  # the round's probe failed: open again, then a new round
    _wait_half_open(b)
    probe = b.allow(P, M)
    assert probe is not None and probe.probe
    b.release(P, M, plain)  # a non-probe attempt ends: the probe slot stays taken
    b.release(P, M, old_probe)  # so does a probe of an older round
    assert b.allow(P, M) is None  # still at most half_open_probes in flight
    b.success(P, M, probe)
    assert b.state(P, M) == "closed"
    b.failure(P, M)
    _wait_half_open(b)
    assert b.allow(P, M) is not None and b.allow(P, M) is None
    b.release(P, M, probe)  # the last round's probe: nothing to free in this round
    assert b.allow(P, M) is None


def _spec(name: str = P, **kw) -> ProviderSpec:
    return ProviderSpec(name=name, kind="openai", base_url="http://127.0.0.1:9/v1", models={M: None}, **kw)


def test_gate_concurrency():
    gates = ProviderGates([_spec(max_concurrency=2), ProviderSpec(name="local", kind="local")])
    assert gates.try_enter(P) and gates.try_enter(P)
    assert gates.saturated(P) and not gates.try_enter(P)
    gates.leave(P)
    assert not gates.saturated(P) and gates.try_enter(P)
    assert all(gates.try_enter("local") for _ in range(100))  # the mesh has its own admission
    assert not gates.saturated("local")


def test_gate_rpm_counts_attempts_not_concurrency():
    gates = ProviderGates([_spec(rpm=3)])
    for _ in range(3):
        assert gates.try_enter(P)
        gates.leave(P)
    assert gates.saturated(P) and not gates.try_enter(P)
    gates.force_enter(P)  # a last resort goes anyway, and leaves as usual
    assert gates.in_flight(P) == 1
    gates.leave(P)
    assert gates.in_flight(P) == 0

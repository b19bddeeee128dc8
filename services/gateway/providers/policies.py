"""Selection policies: the order in which a request tries the providers of a model.

preferred: the file's order (local first unless placed); cheapest: by the cost of a representative
request (1,000 input + 1,000 output tokens and 1 compute second: PricingSpec.cost(1000, 1000, 1.0),
so prices per token, per request and per compute second all count), ties by output price; fastest: by the stats' EWMA (TTFT for generation, else latency) times
(1 + 4 * error rate), with a candidate not measured for probe_after_s put first once so that a
provider that became faster is seen within seconds. Ties keep the preferred order."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from services.gateway.providers.stats import ProviderStats
from services.gateway.providers.types import Candidate

GENERATION_OPS = frozenset({"chat", "completion"})


def _price(c: Candidate) -> tuple[float, float]:
    """The `cheapest` key: a representative request's cost, then the output price (a stable sort
    keeps the preferred order for the rest)."""
    p = c.pricing
    return (p.cost(1000, 1000, 1.0), p.output_per_1k_tokens_usd)


def score(stats: ProviderStats, c: Candidate, op: str) -> float:
    """The `fastest` score (seconds, lower is better); inf when no success was measured."""
    s = stats.sample(c.provider, c.model_id)
    if s is None:
        return math.inf
    base = s.ttft_s if op in GENERATION_OPS and s.ttft_s is not None else s.latency_s
    return math.inf if base is None else base * (1.0 + 4.0 * s.error_rate)


def _fastest(
    candidates: Sequence[Candidate], stats: ProviderStats, op: str, probe_after_s: float, probe: bool
) -> list[Candidate]:
    ranked = sorted(candidates, key=lambda c: score(stats, c, op))
    if not probe or len(ranked) < 2:
        return ranked
    now = time.monotonic()
    for i, c in enumerate(ranked):
        if stats.probe_due(c.provider, c.model_id, probe_after_s, now):
            stats.mark_probed(c.provider, c.model_id, now)
            if i:
                ranked.insert(0, ranked.pop(i))
            break
    return ranked


def rank(
    candidates: Sequence[Candidate],
    policy: str,
    stats: ProviderStats,
    op: str,
    *,
    probe_after_s: float = 5.0,
    probe: bool = True,
) -> list[Candidate]:
    """The candidates (given in preferred order) in the policy's order. `probe=False` ranks
    without sending anyone a probe (listings)."""
    if policy == "cheapest":
        return sorted(candidates, key=_price)
    if policy == "fastest":
        return _fastest(candidates, stats, op, probe_after_s, probe)
    return list(candidates)

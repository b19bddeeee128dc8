"""Live health per provider x model: exponentially weighted averages of latency, time to first
token, throughput and error rate, exported as Prometheus gauges; the `fastest` policy ranks by them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

LATENCY = Gauge(
    "meshserve_provider_latency_seconds", "EWMA of a provider's successful attempt latency.", ["provider", "model"]
)
TTFT = Gauge("meshserve_provider_ttft_seconds", "EWMA of a provider's time to first token.", ["provider", "model"])
THROUGHPUT = Gauge(
    "meshserve_provider_throughput_tokens_per_second", "EWMA of a provider's generated tokens/s.", ["provider", "model"]
)
ERROR_RATE = Gauge(
    "meshserve_provider_error_rate", "EWMA of a provider's failed attempts (0..1).", ["provider", "model"]
)
ATTEMPTS = Counter(
    "meshserve_provider_attempts_total",
    "Attempts at a provider by outcome (ok | retried | failed | client_error).",
    ["provider", "model", "outcome"],
)
FAILOVERS = Counter(
    "meshserve_provider_failovers_total", "Requests served by a candidate other than the first.", ["model"]
)


@dataclass(slots=True)
class Sample:
    """What is known of one provider x model; None where nothing was measured yet."""

    latency_s: float | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    error_rate: float = 0.0
    count: int = 0
    last_at: float = 0.0  # time.monotonic() of the last sample
    probed_at: float = 0.0  # time.monotonic() the `fastest` policy last sent it a probe


class _Series:
    """One key's EWMAs and its gauge children (labelled once, not per request)."""

    __slots__ = ("errors", "latency", "sample", "throughput", "ttft")

    def __init__(self, provider: str, model: str) -> None:
        self.sample = Sample()
        self.latency = LATENCY.labels(provider, model)
        self.ttft = TTFT.labels(provider, model)
        self.throughput = THROUGHPUT.labels(provider, model)
        self.errors = ERROR_RATE.labels(provider, model)


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else old + alpha * (new - old)


class ProviderStats:
    """EWMAs per (provider, model); `alpha` is the weight of the newest sample."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self._series: dict[tuple[str, str], _Series] = {}

    def _get(self, provider: str, model: str) -> _Series:
        series = self._series.get((provider, model))
        if series is None:
            series = self._series[(provider, model)] = _Series(provider, model)
        return series

    def record(
        self,
        provider: str,
        model: str,
        *,
        ok: bool,
        latency_s: float,
        ttft_s: float | None = None,
        output_tokens: int = 0,
    ) -> None:
        """One attempt's result. Latencies average successful attempts only (a provider that fails
        fast is not fast); the error rate averages all."""
        series = self._get(provider, model)
        s, a = series.sample, self.alpha
        s.count += 1
        s.last_at = time.monotonic()
        s.error_rate = _ewma(s.error_rate if s.count > 1 else None, 0.0 if ok else 1.0, a)
        series.errors.set(s.error_rate)
        if not ok:
            return
        s.latency_s = _ewma(s.latency_s, latency_s, a)
        series.latency.set(s.latency_s)
        if ttft_s is not None:
            s.ttft_s = _ewma(s.ttft_s, ttft_s, a)
            series.ttft.set(s.ttft_s)
        if output_tokens > 0 and latency_s > 0:
            self.record_throughput(provider, model, output_tokens=output_tokens, seconds=latency_s)

    def record_throughput(self, provider: str, model: str, *, output_tokens: int, seconds: float) -> None:
        """Tokens/s of a finished generation (a stream's attempt ends at its first token, so its
        throughput is known only when the stream is done)."""
        if output_tokens <= 0 or seconds <= 0:
            return
        series = self._get(provider, model)
        s = series.sample
        s.tokens_per_s = _ewma(s.tokens_per_s, output_tokens / seconds, self.alpha)
        series.throughput.set(s.tokens_per_s)

    def sample(self, provider: str, model: str) -> Sample | None:
        series = self._series.get((provider, model))
        return None if series is None else series.sample

    def probe_due(self, provider: str, model: str, probe_after_s: float, now: float) -> bool:
        """True when nothing was measured or sent as a probe within `probe_after_s`."""
        series = self._series.get((provider, model))
        if series is None:
            return True
        s = series.sample
        return now - max(s.last_at, s.probed_at) > probe_after_s

    def mark_probed(self, provider: str, model: str, now: float) -> None:
        self._get(provider, model).sample.probed_at = now

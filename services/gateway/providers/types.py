"""The values the provider layer passes around: a candidate (a provider serving a model), an
attempt's record, an upstream's failure, and what an upstream answers (generated deltas,
embeddings, rerank scores, a raw HF task reply)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.catalog import PricingSpec

LOCAL = "local"  # the implicit provider: this gateway's own mesh
POLICIES = ("fastest", "cheapest", "preferred")
OPS = ("chat", "completion", "embed", "rerank", "task")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One provider that can serve one model for an op, with what it charges."""

    provider: str
    kind: str  # local | openai | tgi | tei | hf
    model_id: str  # meshserve's id
    upstream_model: str  # the provider's name for it
    pricing: PricingSpec
    context_length: int | None = None


class UpstreamError(Exception):
    """A provider's failure: `retryable` ones move the request to the next candidate (connect
    errors, timeouts, 5xx, 429, 408, and 401/403/404 that mean the provider is misconfigured);
    the others are the caller's fault and go back to the caller as they are (`status`)."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        retryable: bool,
        retry_after: float | None = None,
        code: str = "upstream_error",
        upstream_request_id: str | None = None,
        timeout: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status  # the upstream's HTTP status; 0: no response (connect error, timeout)
        self.retryable = retryable
        self.retry_after = retry_after  # seconds, from Retry-After
        self.code = code
        self.upstream_request_id = upstream_request_id
        self.timeout = timeout


@dataclass(slots=True)
class Attempt:
    """One try of one provider: how it ended (ok | retried | failed | client_error)."""

    provider: str
    outcome: str
    status: int = 0
    latency_s: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class Delta:
    """A piece of generated text, or the final one (with the finish reason and, when the upstream
    said, its token counts)."""

    text: str
    final: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(slots=True)
class Embeddings:
    vectors: np.ndarray  # float32 [n, dim]
    input_tokens: int | None = None
    upstream_request_id: str | None = None


@dataclass(slots=True)
class Reranked:
    scores: list[float]  # one per document, in document order
    input_tokens: int | None = None
    upstream_request_id: str | None = None


@dataclass(slots=True)
class TaskReply:
    content: bytes  # the upstream's JSON answer, as it sent it
    upstream_request_id: str | None = None

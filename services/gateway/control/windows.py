"""Rate-limit windows: the arithmetic and the answers both control stores share.

A key's limits are requests per minute (a moving window: the last 60 s, exact), tokens per minute
(a sliding-window counter: this minute's and the previous minute's counts, the previous one
weighted by the part of it still inside the last 60 s) and concurrent requests (leased slots).
From the state a store saw in its one atomic step (`WindowState`) this module writes an admitted
request's IETF-draft `RateLimit` / `RateLimit-Policy` headers or the RATE_LIMITED refusal, the
refusing limit's item first: huggingface_hub reads only the first item of each header, openai
retries a 429 whose Retry-After is at most MAX_RETRY_AFTER_S.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from services.common.errors import ErrorCode, MeshError
from services.gateway.control.store import MAX_RETRY_AFTER_S, KeyLimits, retry_after

WINDOW_S = 60


class Window(NamedTuple):
    """The state of one limit as the RateLimit headers describe it."""

    name: str  # the header's quoted resource name: a \w+ word (huggingface_hub's regex)
    limit: int
    remaining: int
    reset_s: int  # seconds until the oldest counted use leaves the window (on refusal: Retry-After)
    window_s: int = WINDOW_S


ITEM = '"{}";r={};t={}'  # one item of the RateLimit header
POLICY_ITEM = '"{}";q={};w={}'  # one item of RateLimit-Policy


def rate_limit_headers(windows: list[Window]) -> dict[str, str]:
    """`RateLimit: "requests";r=0;t=12, "tokens";r=900;t=40` and the matching `RateLimit-Policy`."""
    if not windows:
        return {}
    return {
        "RateLimit": ", ".join([ITEM.format(w.name, w.remaining, w.reset_s) for w in windows]),
        "RateLimit-Policy": ", ".join([POLICY_ITEM.format(w.name, w.limit, w.window_s) for w in windows]),
    }


@functools.lru_cache(maxsize=1024)
def admitted_policy(limits: KeyLimits) -> str:
    """RateLimit-Policy of an admitted request (requests, then tokens): it changes only with the
    key's limits."""
    items = [("requests", limits.requests_per_minute), ("tokens", limits.tokens_per_minute)]
    return ", ".join([POLICY_ITEM.format(name, limit, WINDOW_S) for name, limit in items if limit is not None])


def tokens_wait_s(
    limit: int, needed: int, prev_count: int, prev_ttl_s: float, cur_count: int, cur_ttl_s: float
) -> float:
    """Seconds until a sliding-window counter has room for `needed` more (at most 2 windows).

    The counter weighs the previous window by the part of it still inside the last 60 s
    (`prev_count * prev_ttl / 60`) and adds the current window; the current window's counter lives
    for two windows, so it becomes the previous one `cur_ttl - 60` seconds from now.
    """
    if cur_count + needed <= limit:
        if prev_count == 0:
            return 0.0
        return max(0.0, prev_ttl_s - (limit - needed - cur_count) * WINDOW_S / prev_count)
    rolls_in = max(0.0, cur_ttl_s - WINDOW_S)
    return rolls_in + max(0.0, WINDOW_S - (limit - needed) * WINDOW_S / cur_count)


def sliding_stats(limit: int, window: tuple[int, float, int, float]) -> tuple[int, float]:
    """(remaining, seconds until a use leaves) of a sliding-window counter, as `limits` computes them."""
    previous, previous_ttl, current, current_ttl = window
    remaining = max(0, limit - math.floor(previous * previous_ttl / WINDOW_S + current))
    resets = [math.inf]
    if previous:
        resets.append(previous_ttl % (WINDOW_S / previous))
    if current:
        resets.append(current_ttl % WINDOW_S)
    reset = min(resets)
    return remaining, 0.0 if reset == math.inf else reset


class WindowState(NamedTuple):
    """One key's limits as a store saw them in one atomic step, admitting or not."""

    verdict: str  # "ok" (admitted and counted), or the limit that refused: "tokens", "concurrent", "requests"
    requests: int  # requests in the last minute (this one included when admitted)
    requests_reset_s: float  # until the oldest of them leaves the window (0: none)
    tokens_previous: int  # the tokens counter: the previous minute's count,
    tokens_current: int  # this minute's,
    into_s: float  # and how far into this minute the store's clock is
    in_flight: int  # requests holding a concurrency slot (this one included when admitted)

    def tokens_window(self) -> tuple[int, float, int, float]:
        """(previous count, its ttl, current count, its ttl), as `sliding_stats` takes them."""
        previous, into = self.tokens_previous, self.into_s
        return previous, (WINDOW_S - into) if previous else 0.0, self.tokens_current, 2 * WINDOW_S - into


def verdict(out_of_tokens: bool, busy: bool, full: bool) -> str:
    """The limit that refuses (tokens first, then concurrency, then requests), or "ok"."""
    return "tokens" if out_of_tokens else "concurrent" if busy else "requests" if full else "ok"


def admitted_headers(limits: KeyLimits, state: WindowState) -> dict[str, str]:
    """The RateLimit headers of an admitted request (requests first, then tokens)."""
    rpm, tpm, _ = limits
    value = ""
    if tpm is not None:
        remaining, reset_s = sliding_stats(tpm, state.tokens_window())
        value = ITEM.format("tokens", remaining, math.ceil(reset_s))
    if rpm is not None:
        item = ITEM.format("requests", max(0, rpm - state.requests), math.ceil(state.requests_reset_s))
        value = f"{item}, {value}" if value else item
    return {"RateLimit": value, "RateLimit-Policy": admitted_policy(limits)} if value else {}


def refusal(limits: KeyLimits, tokens_hint: int, state: WindowState) -> MeshError:
    """The RATE_LIMITED error of a step that refused, the refusing limit's item first."""
    rpm, tpm, concurrent = limits
    requests = []
    if rpm is not None:
        requests = [Window("requests", rpm, max(0, rpm - state.requests), math.ceil(state.requests_reset_s))]
    tokens = []
    if tpm is not None:
        remaining, reset_s = sliding_stats(tpm, state.tokens_window())
        tokens = [Window("tokens", tpm, remaining, math.ceil(reset_s))]
    if state.verdict == "tokens":
        return _tokens_refusal(tpm, tokens_hint, state, requests)
    if state.verdict == "concurrent":
        # When a slot frees is unknown: ask for a retry in a second. The item gets a 1 s
        # "window" so that huggingface_hub's message reads "0/4 requests remaining in current 1s window".
        return MeshError(
            ErrorCode.RATE_LIMITED,
            f"too many concurrent requests: this API key may have {concurrent} in flight "
            f"and has {state.in_flight}; retry after 1 s",
            retry_after_s=1,
            headers=rate_limit_headers([Window("concurrent", concurrent, 0, 1, window_s=1), *requests, *tokens]),
        )
    # The moving window's reset is when its oldest request leaves: exactly when one fits again.
    wait = retry_after(state.requests_reset_s)
    return MeshError(
        ErrorCode.RATE_LIMITED,
        f"rate limit reached: this API key may send {rpm} requests per minute; retry after {wait} s",
        retry_after_s=wait,
        headers=rate_limit_headers([Window("requests", rpm, 0, wait), *tokens]),
    )


def _tokens_refusal(limit: int, tokens_hint: int, state: WindowState, requests: list[Window]) -> MeshError:
    needed = max(1, tokens_hint)
    if needed > limit:
        # No wait will ever make room: say so, and tell openai not to retry.
        return MeshError(
            ErrorCode.RATE_LIMITED,
            f"request too large: it needs about {needed} tokens, more than this API key's limit of "
            f"{limit} tokens per minute",
            retry_after_s=MAX_RETRY_AFTER_S,
            headers={
                **rate_limit_headers([Window("tokens", limit, 0, MAX_RETRY_AFTER_S), *requests]),
                "x-should-retry": "false",
            },
        )
    counts = state.tokens_window()
    remaining = sliding_stats(limit, counts)[0]
    wait = retry_after(tokens_wait_s(limit, needed, *counts))
    hint = f", this request needs about {tokens_hint}" if tokens_hint else ""
    return MeshError(
        ErrorCode.RATE_LIMITED,
        f"rate limit reached: this API key may use {limit} tokens per minute ({remaining} left{hint}); "
        f"retry after {wait} s",
        retry_after_s=wait,
        headers=rate_limit_headers([Window("tokens", limit, 0, wait), *requests]),
    )

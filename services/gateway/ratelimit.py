"""Per-API-key rate limits: requests per minute, tokens per minute and concurrent requests.

Transport-neutral: `RateLimiter.admit()` either returns an `Admission` (with the IETF-draft
`RateLimit` / `RateLimit-Policy` headers to send on success) or raises a RATE_LIMITED `MeshError`
carrying `Retry-After` and the same headers, the refusing limit first: huggingface_hub reads only
the first item of each header and prints "Retry after N seconds (r/q requests remaining in current
w s window)" from it; openai retries a 429 whose Retry-After is at most 120 s.

Two window kinds, with the same arithmetic in both stores:
- requests per minute use a **moving window**: exact (the last 60 s, no burst of 2x the limit at a
  window boundary), at the cost of one stored timestamp per request, which is fine for request
  counts;
- tokens per minute use a **sliding-window counter**: two counters per key whatever the amount (a
  moving window stores one entry per unit: 100k timestamps for a 100k-token limit), accurate to
  the weighting of the previous minute. Tokens are only known after the response, so admission
  checks the room for `tokens_hint` and `Admission.done(tokens)` charges what was used; a request
  that used more than was left saturates the window (the overshoot is not carried over).

In Redis (`redis://…`, shared by every gateway replica) the windows are the `limits` library's.
In process (`memory://`, the default) they are kept here, because `limits`' in-memory storage
costs about 20 µs per request (async locks, an expiry timer rescheduled on every hit, and a moving
window that inserts at the front of a list: O(n) in the requests of the last minute), which is
most of what a cached response costs. The in-process moving window is a deque of timestamps
(append and expire at the ends: O(1) amortized), and the counter is `limits`' own formula over
windows aligned to the minute, so both stores admit and refuse alike (one test suite runs on both).

Concurrency is a set of leased slots, not a bare INCR/DECR counter: in Redis a sorted set per key
(member = slot, score = lease deadline in Redis server time), updated by one Lua script. A replica
that crashes holding slots leaks them only until their lease ends, even while the key stays busy
(an INCR counter with a key-wide TTL is refreshed by every new request and would leak forever).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from collections import deque
from typing import NamedTuple

import redis.asyncio as aioredis
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from services.common.errors import ErrorCode, MeshError

log = logging.getLogger(__name__)

WINDOW_S = 60
MAX_RETRY_AFTER_S = 120  # openai gives up on a Retry-After above this
KEY_PREFIX = "meshserve:ratelimit"


class KeyLimits(NamedTuple):
    """One API key's limits; None = unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion
    concurrent_requests: int | None = None


class _Window(NamedTuple):
    """The state of one limit as the RateLimit headers describe it."""

    name: str  # the header's quoted resource name: a \w+ word (huggingface_hub's regex)
    limit: int
    remaining: int
    reset_s: int  # seconds until the oldest counted use leaves the window (on refusal: Retry-After)
    window_s: int = WINDOW_S


_ITEM = '"{}";r={};t={}'  # one item of the RateLimit header
_POLICY_ITEM = '"{}";q={};w={}'  # one item of RateLimit-Policy


def rate_limit_headers(windows: list[_Window]) -> dict[str, str]:
    """`RateLimit: "requests";r=0;t=12, "tokens";r=900;t=40` and the matching `RateLimit-Policy`."""
    if not windows:
        return {}
    return {
        "RateLimit": ", ".join([_ITEM.format(w.name, w.remaining, w.reset_s) for w in windows]),
        "RateLimit-Policy": ", ".join([_POLICY_ITEM.format(w.name, w.limit, w.window_s) for w in windows]),
    }


@functools.lru_cache(maxsize=1024)
def _admitted_policy(limits: KeyLimits) -> str:
    """RateLimit-Policy of an admitted request (requests, then tokens): it changes only with the
    key's limits."""
    items = [("requests", limits.requests_per_minute), ("tokens", limits.tokens_per_minute)]
    return ", ".join([_POLICY_ITEM.format(name, limit, WINDOW_S) for name, limit in items if limit is not None])


def _retry_after(seconds: float) -> int:
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds)))


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


class store_errors:
    """A Redis outage refuses the request as retryable (503), never as an internal error.
    (A class: it is entered on every request, and a generator-based one costs several times more.)"""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, _tb) -> bool:
        if kind is not None and issubclass(kind, aioredis.RedisError):
            log.warning("%s store unavailable: %r", self.what, exc)
            raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, f"{self.what} store is unavailable") from exc
        return False


class _MemoryWindows:
    """One process's windows (see the module docstring); nothing awaits, so every check-and-update
    is atomic on the event loop. The `*_now` methods are the synchronous forms that
    `RateLimiter.admit_now()` uses; the coroutines are the store interface shared with Redis."""

    def __init__(self) -> None:
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, list] = {}  # key -> [window index, previous count, current count]

    def _moving(self, key_id: str, now: float) -> deque[float]:
        times = self._requests.get(key_id)
        if times is None:
            times = self._requests[key_id] = deque()
        horizon = now - WINDOW_S
        while times and times[0] <= horizon:
            times.popleft()
        return times

    def hit_requests_now(self, key_id: str, limit: int, now: float) -> tuple[bool, int, float]:
        """Count one request if it fits (nothing changes when it does not)."""
        times = self._moving(key_id, now)
        admitted = len(times) < limit
        if admitted:
            times.append(now)
        return admitted, max(0, limit - len(times)), (times[0] + WINDOW_S - now) if times else 0.0

    async def hit_requests(self, key_id: str, limit: int) -> tuple[bool, int, float]:
        return self.hit_requests_now(key_id, limit, time.time())

    async def requests_window(self, key_id: str, limit: int) -> tuple[int, float]:
        now = time.time()
        times = self._moving(key_id, now)
        return max(0, limit - len(times)), (times[0] + WINDOW_S - now) if times else 0.0

    def _counter(self, key_id: str, now: float) -> list:
        index = int(now // WINDOW_S)
        counter = self._tokens.get(key_id)
        if counter is None:
            counter = self._tokens[key_id] = [index, 0, 0]
        elif counter[0] != index:  # roll: the current window becomes the previous one (or both go)
            counter[:] = [index, counter[2] if counter[0] == index - 1 else 0, 0]
        return counter

    def sliding_window_now(self, key_id: str, now: float) -> tuple[int, float, int, float]:
        _, previous, current = self._counter(key_id, now)
        into = now % WINDOW_S
        return previous, (WINDOW_S - into) if previous else 0.0, current, 2 * WINDOW_S - into

    async def sliding_window(self, key_id: str, limit: int) -> tuple[int, float, int, float]:
        """(previous count, its ttl, current count, its ttl), as `limits`' storages answer."""
        return self.sliding_window_now(key_id, time.time())

    def charge_tokens_now(self, key_id: str, limit: int, cost: int) -> bool:
        now = time.time()
        counter = self._counter(key_id, now)
        weighted = counter[1] * (WINDOW_S - now % WINDOW_S) / WINDOW_S + counter[2]
        if cost > limit or math.floor(weighted) + cost > limit:
            return False
        counter[2] += cost
        return True

    async def charge_tokens(self, key_id: str, limit: int, cost: int) -> bool:
        return self.charge_tokens_now(key_id, limit, cost)


class _LimitsWindows:
    """The windows in a store shared by replicas, through the `limits` library."""

    def __init__(self, storage: RedisStorage) -> None:
        self._storage = storage
        self._rpm = MovingWindowRateLimiter(storage)
        self._tpm = SlidingWindowCounterRateLimiter(storage)

    @staticmethod
    def _requests_item(limit: int) -> RateLimitItemPerMinute:
        return RateLimitItemPerMinute(limit, namespace="requests")

    @staticmethod
    def _tokens_item(limit: int) -> RateLimitItemPerMinute:
        return RateLimitItemPerMinute(limit, namespace="tokens")

    async def hit_requests(self, key_id: str, limit: int) -> tuple[bool, int, float]:
        admitted = await self._rpm.hit(self._requests_item(limit), key_id)
        return (admitted, *await self.requests_window(key_id, limit))

    async def requests_window(self, key_id: str, limit: int) -> tuple[int, float]:
        stats = await self._rpm.get_window_stats(self._requests_item(limit), key_id)
        return max(0, stats.remaining), max(0.0, stats.reset_time - time.time())

    async def sliding_window(self, key_id: str, limit: int) -> tuple[int, float, int, float]:
        return await self._storage.get_sliding_window(self._tokens_item(limit).key_for(key_id), WINDOW_S)

    async def charge_tokens(self, key_id: str, limit: int, cost: int) -> bool:
        return await self._tpm.hit(self._tokens_item(limit), key_id, cost=cost)


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


class _MemorySlots:
    """In-flight counts per key for one process: no await between check and update, so atomic."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}

    def acquire_now(self, key_id: str, limit: int) -> tuple[str | None, int]:
        count = self._in_flight.get(key_id, 0)
        if count >= limit:
            return None, count
        self._in_flight[key_id] = count + 1
        return "local", count + 1  # a count, not a set: every slot of a key is alike

    async def acquire(self, key_id: str, limit: int) -> tuple[str | None, int]:
        return self.acquire_now(key_id, limit)

    def release_now(self, key_id: str) -> None:
        count = self._in_flight.get(key_id, 0) - 1
        if count > 0:
            self._in_flight[key_id] = count
        else:
            self._in_flight.pop(key_id, None)

    async def release(self, key_id: str, slot: str) -> None:
        self.release_now(key_id)

    async def close(self) -> None:
        pass


# KEYS[1]: the key's in-flight set. ARGV: limit, slot id, lease in ms. Returns {admitted, in flight}.
_ACQUIRE_SLOT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[1]) then
  return {0, count}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, count + 1}
"""


class _RedisSlots:
    """In-flight slots shared by every replica: a sorted set of leased slots per key."""

    def __init__(self, client: aioredis.Redis, lease_s: float) -> None:
        self._client = client
        self._lease_ms = max(1, int(lease_s * 1000))
        self._acquire = client.register_script(_ACQUIRE_SLOT)

    @staticmethod
    def _key(key_id: str) -> str:
        return f"{KEY_PREFIX}:inflight:{{{key_id}}}"

    async def acquire(self, key_id: str, limit: int) -> tuple[str | None, int]:
        slot = uuid.uuid4().hex
        admitted, count = await self._acquire([self._key(key_id)], [limit, slot, self._lease_ms])
        return (slot if admitted else None), int(count)

    async def release(self, key_id: str, slot: str) -> None:
        await self._client.zrem(self._key(key_id), slot)

    async def close(self) -> None:
        pass  # the client belongs to the RateLimiter


class Admission:
    """An admitted request. The caller MUST call `done(tokens)` (or `done_now(tokens)`) exactly once
    (extra calls are no-ops)."""

    __slots__ = ("_done", "_key_id", "_limiter", "_limits", "_slot", "headers")

    def __init__(self, limiter: RateLimiter, key_id: str, limits: KeyLimits, slot: str | None, headers: dict) -> None:
        self.headers: dict[str, str] = headers
        self._limiter = limiter
        self._key_id = key_id
        self._limits = limits
        self._slot = slot
        self._done = False

    def done_now(self, tokens: int) -> bool:
        """`done()` without a coroutine when the limiter's state is in process; False (nothing done)
        when it is remote: then await `done()`."""
        if self._limiter.remote:
            return False
        if self._done:
            return True
        self._done = True
        tpm = self._limits.tokens_per_minute
        if tpm is not None and tokens > 0:
            self._limiter._charge_tokens_now(self._key_id, tpm, tokens)
        if self._slot is not None:
            self._limiter._slots.release_now(self._key_id)
        return True

    async def done(self, tokens: int) -> None:
        """Charge `tokens` (prompt + completion) to the tokens-per-minute window, free the slot.

        Never raises: it runs on the way out of a request, where a store outage must not replace
        the response (a slot that could not be freed is reclaimed when its lease ends)."""
        if self._done:
            return
        self._done = True
        try:
            if self._limits.tokens_per_minute is not None and tokens > 0:
                await self._limiter._charge_tokens(self._key_id, self._limits.tokens_per_minute, tokens)
        except Exception:
            log.exception("could not charge %d tokens to key %s", tokens, self._key_id)
        finally:
            if self._slot is not None:
                try:
                    await self._limiter._slots.release(self._key_id, self._slot)
                except Exception:
                    log.exception("could not free a concurrency slot of key %s", self._key_id)


class RateLimiter:
    """Admits or refuses requests per API key; state in process or in a Redis shared by replicas."""

    def __init__(self, storage_uri: str = "memory://", *, slot_lease_s: float = 600.0) -> None:
        """`storage_uri`: `memory://` or `redis://host:port/db` (`rediss://` for TLS).
        `slot_lease_s`: how long a concurrency slot held in Redis outlives a replica that died
        holding it; a request running longer than this stops counting against the limit."""
        self._client: aioredis.Redis | None = None
        if storage_uri.startswith("memory://"):
            self._windows: _MemoryWindows | _LimitsWindows = _MemoryWindows()
            self._slots: _MemorySlots | _RedisSlots = _MemorySlots()
        elif storage_uri.startswith(("redis://", "rediss://")):
            self._pool = aioredis.ConnectionPool.from_url(storage_uri)
            self._client = aioredis.Redis(connection_pool=self._pool)
            storage = RedisStorage(
                f"async+{storage_uri}", implementation="redispy", key_prefix=KEY_PREFIX, connection_pool=self._pool
            )
            self._windows = _LimitsWindows(storage)
            self._slots = _RedisSlots(self._client, slot_lease_s)
        else:
            raise ValueError(f"unsupported rate-limit storage {storage_uri!r}: use memory:// or redis://")
        self.remote = self._client is not None  # whether its calls wait on a store

    def admit_now(self, key_id: str, limits: KeyLimits, *, tokens_hint: int = 0) -> Admission | None:
        """`admit()` without a coroutine, for the in-process store and a request that every limit
        admits: the common case, kept to a few dict and deque operations because the cached path
        pays for every Python call here. None, with nothing changed, when the store is remote or a
        limit would refuse: then await `admit()`, which decides (and raises the refusal)."""
        if self.remote:
            return None
        windows, now = self._windows, time.time()
        rpm, tpm, concurrent = limits
        value = ""  # the RateLimit header, built here: no _Window objects on this path
        if tpm is not None:
            remaining, reset_s = sliding_stats(tpm, windows.sliding_window_now(key_id, now))
            if remaining < max(1, tokens_hint):
                return None
            value = _ITEM.format("tokens", remaining, math.ceil(reset_s))
        if concurrent is not None and self._slots._in_flight.get(key_id, 0) >= concurrent:
            return None
        if rpm is not None:
            hit, remaining, reset_s = windows.hit_requests_now(key_id, rpm, now)
            if not hit:
                return None
            item = _ITEM.format("requests", remaining, math.ceil(reset_s))
            value = f"{item}, {value}" if value else item
        slot = self._slots.acquire_now(key_id, concurrent)[0] if concurrent is not None else None
        headers = {"RateLimit": value, "RateLimit-Policy": _admitted_policy(limits)} if value else {}
        return Admission(self, key_id, limits, slot, headers)

    async def admit(self, key_id: str, limits: KeyLimits, *, tokens_hint: int = 0) -> Admission:
        """Admit one request of `key_id` or raise RATE_LIMITED naming the limit that refused it.

        Checks cost nothing when they refuse: tokens are only read, a concurrency slot is freed
        again when the requests-per-minute window (the one irreversible hit) refuses."""
        with store_errors("rate-limit"):
            windows: list[_Window] = []
            if limits.tokens_per_minute is not None:
                windows.append(await self._check_tokens(key_id, limits, tokens_hint))
            slot = None
            if limits.concurrent_requests is not None:
                slot, in_flight = await self._slots.acquire(key_id, limits.concurrent_requests)
                if slot is None:
                    await self._refuse_concurrency(key_id, limits, in_flight)
            try:
                if limits.requests_per_minute is not None:
                    windows.insert(0, await self._hit_requests(key_id, limits))
            except BaseException:
                if slot is not None:
                    await self._slots.release(key_id, slot)
                raise
        return Admission(self, key_id, limits, slot, rate_limit_headers(windows))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            await self._pool.aclose()

    # -- requests per minute (moving window) ----------------------------------------------------
    async def _requests_window(self, key_id: str, limit: int) -> _Window:
        remaining, reset_s = await self._windows.requests_window(key_id, limit)
        return _Window("requests", limit, remaining, math.ceil(reset_s))

    async def _hit_requests(self, key_id: str, limits: KeyLimits) -> _Window:
        limit = limits.requests_per_minute
        admitted, remaining, reset_s = await self._windows.hit_requests(key_id, limit)
        if admitted:
            return _Window("requests", limit, remaining, math.ceil(reset_s))
        # The moving window's reset is when its oldest request leaves: exactly when one fits again.
        wait = _retry_after(reset_s)
        refused = _Window("requests", limit, 0, wait)
        others = (
            [await self._tokens_window(key_id, limits.tokens_per_minute)]
            if limits.tokens_per_minute is not None
            else []
        )
        raise MeshError(
            ErrorCode.RATE_LIMITED,
            f"rate limit reached: this API key may send {limit} requests per minute; retry after {wait} s",
            retry_after_s=wait,
            headers=rate_limit_headers([refused, *others]),
        )

    # -- tokens per minute (sliding-window counter) ----------------------------------------------
    async def _tokens_window(self, key_id: str, limit: int) -> _Window:
        remaining, reset_s = sliding_stats(limit, await self._windows.sliding_window(key_id, limit))
        return _Window("tokens", limit, remaining, math.ceil(reset_s))

    async def _check_tokens(self, key_id: str, limits: KeyLimits, tokens_hint: int) -> _Window:
        limit = limits.tokens_per_minute
        needed = max(1, tokens_hint)  # a hint of 0 is refused only when the window is exhausted
        counts = await self._windows.sliding_window(key_id, limit)
        remaining, reset_s = sliding_stats(limit, counts)
        if remaining >= needed:
            return _Window("tokens", limit, remaining, math.ceil(reset_s))
        others = (
            [await self._requests_window(key_id, limits.requests_per_minute)]
            if limits.requests_per_minute is not None
            else []
        )
        if needed > limit:
            # No wait will ever make room: say so, and tell openai not to retry.
            raise MeshError(
                ErrorCode.RATE_LIMITED,
                f"request too large: it needs about {needed} tokens, more than this API key's limit of "
                f"{limit} tokens per minute",
                retry_after_s=MAX_RETRY_AFTER_S,
                headers={
                    **rate_limit_headers([_Window("tokens", limit, 0, MAX_RETRY_AFTER_S), *others]),
                    "x-should-retry": "false",
                },
            )
        wait = _retry_after(tokens_wait_s(limit, needed, *counts))
        hint = f", this request needs about {tokens_hint}" if tokens_hint else ""
        raise MeshError(
            ErrorCode.RATE_LIMITED,
            f"rate limit reached: this API key may use {limit} tokens per minute ({remaining} left{hint}); "
            f"retry after {wait} s",
            retry_after_s=wait,
            headers=rate_limit_headers([_Window("tokens", limit, 0, wait), *others]),
        )

    def _charge_tokens_now(self, key_id: str, limit: int, tokens: int) -> None:
        """`_charge_tokens` in process (where nothing can take the room between the two calls)."""
        windows = self._windows
        cost = min(tokens, limit)
        if not windows.charge_tokens_now(key_id, limit, cost):
            cost = min(cost, sliding_stats(limit, windows.sliding_window_now(key_id, time.time()))[0])
            if cost > 0:
                windows.charge_tokens_now(key_id, limit, cost)

    async def _charge_tokens(self, key_id: str, limit: int, tokens: int) -> None:
        """Charge what a finished request used; beyond the room left, the window saturates."""
        cost = min(tokens, limit)
        for _ in range(3):  # another replica may take the room between the two calls: try again
            if await self._windows.charge_tokens(key_id, limit, cost):
                return
            cost = min(cost, sliding_stats(limit, await self._windows.sliding_window(key_id, limit))[0])
            if cost <= 0:
                return

    # -- concurrency -------------------------------------------------------------------------------
    async def _refuse_concurrency(self, key_id: str, limits: KeyLimits, in_flight: int) -> None:
        # When a slot frees is unknown: ask for a retry in a second. The item gets a 1 s "window"
        # so that huggingface_hub's message reads "0/4 requests remaining in current 1s window".
        windows = [_Window("concurrent", limits.concurrent_requests, 0, 1, window_s=1)]
        if limits.requests_per_minute is not None:
            windows.append(await self._requests_window(key_id, limits.requests_per_minute))
        if limits.tokens_per_minute is not None:
            windows.append(await self._tokens_window(key_id, limits.tokens_per_minute))
        raise MeshError(
            ErrorCode.RATE_LIMITED,
            f"too many concurrent requests: this API key may have {limits.concurrent_requests} in flight "
            f"and has {in_flight}; retry after 1 s",
            retry_after_s=1,
            headers=rate_limit_headers(windows),
        )

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

Each store takes **one atomic step per admission** (read every window, and count the request and
take its slot only if every limit admits) and one per completion (charge the tokens, free the
slot), with the same arithmetic and the same refusals (one renderer; one test suite runs on both):
- in process (`memory://`, the default) one object per key: a deque of timestamps for the moving
  window (append and expire at the ends: O(1) amortized), this and the previous minute's token
  counts, an in-flight count. The step is one function that answers the Admission and its headers
  itself, and `admit_now()` / `done_now()` take it without a coroutine: on the gateway's cached
  path every Python call and object per request shows;
- in Redis (`redis://…`, shared by every gateway replica) one Lua script per step, in Redis server
  time: a sorted set of admission times, a hash for the counter, a sorted set of leased slots.

Hand-written rather than the `limits` library (used here before): its in-memory storage cost ~20 µs
a request (async locks, an expiry timer rescheduled on every hit, a moving window that inserts at the
front of a list: O(n) in the last minute's requests), and in Redis its API takes four round trips
to check tokens, take a slot, hit the moving window and read that window's state, plus two to
finish; every round trip costs ~100 µs of redis-py CPU in the gateway. The arithmetic is the same
as `limits`' (its sliding-window-counter weighting, a moving window of the last 60 s).

Concurrency is a set of leased slots, not a bare INCR/DECR counter: in Redis a sorted set per key
(member = slot, score = lease deadline in Redis server time). A replica that crashes holding slots
leaks them only until their lease ends, even while the key stays busy (an INCR counter with a
key-wide TTL is refreshed by every new request and would leak forever).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections import deque
from typing import NamedTuple

import redis.asyncio as aioredis

from services.common.errors import ErrorCode, MeshError
from services.common.ids import new_id
from services.gateway.control.redis_steps import Step

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


class _State(NamedTuple):
    """One key's limits as a store sees them in one atomic step, admitting or not."""

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


def _verdict(state_tokens: bool, state_concurrent: bool, state_requests: bool) -> str:
    return "tokens" if state_tokens else "concurrent" if state_concurrent else "requests" if state_requests else "ok"


class _KeyWindows:
    """One key's limits in process: the moving window's admission times, the tokens counter (this
    minute's count and the previous minute's) and the requests in flight."""

    __slots__ = ("current", "in_flight", "minute", "previous", "times")

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.minute = 0  # the minute (index since the epoch) that `current` counts
        self.previous = 0
        self.current = 0
        self.in_flight = 0


class _MemoryStore:
    """One process's windows and slots (see the module docstring). Nothing awaits, so every step is
    atomic on the event loop, and the step itself answers: an Admission with its headers, or the
    refusal (RateLimiter._refusal, from the state it saw, as for Redis). Written as one function per
    step: on the gateway's cached path every Python call and object shows."""

    remote = False

    def __init__(self) -> None:
        self._keys: dict[str, _KeyWindows] = {}

    def take(self, limiter: RateLimiter, key_id: str, limits: KeyLimits, tokens_hint: int) -> LocalAdmission:
        rpm, tpm, concurrent = limits
        windows = self._keys.get(key_id)
        if windows is None:
            windows = self._keys[key_id] = _KeyWindows()
        now = time.time()
        into = now % WINDOW_S
        rest = WINDOW_S - into  # of this minute
        previous = current = used = 0
        if tpm is not None:
            minute = int(now // WINDOW_S)
            if windows.minute != minute:  # roll: this minute becomes the previous one (or both go)
                windows.previous = windows.current if windows.minute == minute - 1 else 0
                windows.current, windows.minute = 0, minute
            previous, current = windows.previous, windows.current
            used = int(previous * rest / WINDOW_S + current)  # the sliding-window counter
        times = windows.times
        if rpm is not None:
            horizon = now - WINDOW_S
            while times and times[0] <= horizon:
                times.popleft()
        count = len(times)
        in_flight = windows.in_flight
        out_of_tokens = tpm is not None and tpm - used < (tokens_hint if tokens_hint > 1 else 1)
        busy = concurrent is not None and in_flight >= concurrent
        full = rpm is not None and count >= rpm
        if out_of_tokens or busy or full:
            reset = (times[0] + WINDOW_S - now) if count else 0.0
            state = _State(_verdict(out_of_tokens, busy, full), count, reset, previous, current, into, in_flight)
            raise limiter._refusal(limits, tokens_hint, state)
        # Admitted: the headers as _decide() writes them (the tokens reset is sliding_stats' for
        # this state: when the previous minute's weight next drops a token, else the minute's end).
        tokens = ""
        if tpm is not None:
            # sliding_stats' min over the two counts, written out: the current count's reset,
            # rest % WINDOW_S, is `rest` itself (never below the other) except right on the minute.
            reset_s = rest % (WINDOW_S / previous) if previous else (rest if current else 0.0)
            if current and into == 0.0:
                reset_s = 0.0
            tokens = f'"tokens";r={tpm - used};t={math.ceil(reset_s)}'
        if rpm is not None:
            times.append(now)
            value = f'"requests";r={rpm - count - 1};t={math.ceil(times[0] + WINDOW_S - now)}'
            if tokens:
                value = f"{value}, {tokens}"
        else:
            value = tokens
        if concurrent is not None:
            windows.in_flight = in_flight + 1
        headers = {"RateLimit": value, "RateLimit-Policy": _admitted_policy(limits)} if value else {}
        return LocalAdmission(windows, tpm, concurrent is not None, now if rpm is not None else None, headers)

    async def close(self) -> None:
        pass


class LocalAdmission:
    """An Admission (the same interface) of the in-process store; finishing changes the key's
    windows directly, without a coroutine."""

    __slots__ = ("_at", "_done", "_slot", "_tpm", "_windows", "headers")

    def __init__(self, windows: _KeyWindows, tpm: int | None, slot: bool, at: float | None, headers: dict) -> None:
        self.headers: dict[str, str] = headers
        self._windows = windows
        self._tpm = tpm
        self._slot = slot
        self._at = at  # the request's time in the moving window (what a refund takes out)
        self._done = False

    def done_now(self, tokens: int) -> bool:
        """Charge the tokens (beyond the room left, the window saturates: the overshoot is not
        carried over) and free the slot. Always True: nothing is remote."""
        if self._done:
            return True
        self._done = True
        windows, tpm = self._windows, self._tpm
        if tpm is not None and tokens > 0:
            now = time.time()
            minute = int(now // WINDOW_S)
            if windows.minute != minute:  # (the same roll as take())
                windows.previous = windows.current if windows.minute == minute - 1 else 0
                windows.current, windows.minute = 0, minute
            room = tpm - int(windows.previous * (WINDOW_S - now % WINDOW_S) / WINDOW_S + windows.current)
            charge = tokens if tokens < room else room
            if charge > 0:
                windows.current += charge
        if self._slot:
            windows.in_flight -= 1
        return True

    def refund_now(self) -> bool:
        """Free the slot and take the request back out of the moving window."""
        if not self._done and self._at is not None:
            with contextlib.suppress(ValueError):  # it already left the window
                self._windows.times.remove(self._at)
        return self.done_now(0)

    def done_step(self, tokens: int) -> None:
        """Done here and now: nothing to send to Redis."""
        self.done_now(tokens)

    async def done(self, tokens: int) -> None:
        self.done_now(tokens)

    async def refund(self) -> None:
        self.refund_now()


# The same steps as _MemoryStore, in Redis server time, one script per step (a round trip costs the
# gateway ~70 µs of redis-py and socket time; Metering sends the budget's step along in the same
# one, see redis_steps). Keys share one hash tag (the API key id): one cluster slot. Times in ms.
#   requests  sorted set: member = request, score = when it was admitted
#   tokens    hash: i = minute index, p = previous minute's count, c = this minute's
#   inflight  sorted set: member = slot, score = lease deadline
_REDIS_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = 60000
local into = now % window
local index = math.floor(now / window)
local function tokens_counter()
  local h = redis.call('HMGET', KEYS[2], 'i', 'p', 'c')
  local stored = tonumber(h[1])
  if stored == index then return tonumber(h[2]) or 0, tonumber(h[3]) or 0 end
  if stored == index - 1 then return tonumber(h[3]) or 0, 0 end
  return 0, 0
end
"""
# KEYS: requests, tokens, inflight. ARGV: rpm, tpm, concurrent (-1: no limit), tokens needed, slot id,
# slot lease ms. Returns {verdict, requests, ms until the oldest leaves, previous, current, ms into
# the minute, in flight}.
_ADMIT = (
    _REDIS_CLOCK
    + """
local rpm, tpm, concurrent, needed = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local previous, current = 0, 0
if tpm >= 0 then previous, current = tokens_counter() end
local count = 0
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  count = redis.call('ZCARD', KEYS[1])
end
local in_flight = 0
if concurrent >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  in_flight = redis.call('ZCARD', KEYS[3])
end
local verdict = 'ok'
if tpm >= 0 and tpm - math.floor(previous * (window - into) / window + current) < needed then
  verdict = 'tokens'
elseif concurrent >= 0 and in_flight >= concurrent then
  verdict = 'concurrent'
elseif rpm >= 0 and count >= rpm then
  verdict = 'requests'
end
if verdict == 'ok' then
  if rpm >= 0 then
    redis.call('ZADD', KEYS[1], now, ARGV[5])
    redis.call('PEXPIRE', KEYS[1], window)
    count = count + 1
  end
  if concurrent >= 0 then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
    redis.call('PEXPIRE', KEYS[3], ARGV[6])
    in_flight = in_flight + 1
  end
end
local reset = 0
if count > 0 then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  reset = tonumber(oldest[2]) + window - now
end
return {verdict, count, reset, previous, current, into, in_flight}
"""
)
# KEYS: requests, tokens, inflight. ARGV: tpm (-1: no limit), tokens used, slot id ('': none), the
# request's member in the moving window to take out ('': none; a refund).
_DONE = (
    _REDIS_CLOCK
    + """
local tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm >= 0 and tokens > 0 then
  local previous, current = tokens_counter()
  local room = tpm - math.floor(previous * (window - into) / window + current)
  local charged = math.max(0, math.min(tokens, room))
  redis.call('HSET', KEYS[2], 'i', index, 'p', previous, 'c', current + charged)
  redis.call('PEXPIRE', KEYS[2], 2 * window)
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[3], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[1], ARGV[4]) end
return 1
"""
)


class _RedisStore:
    """The windows and slots in a Redis shared by every replica."""

    remote = True

    def __init__(self, storage_uri: str, lease_s: float, client: aioredis.Redis | None = None) -> None:
        self._owned = client is None  # a client passed in is closed by its owner
        self._client = client if client is not None else aioredis.Redis.from_url(storage_uri)
        self._lease_ms = max(1, int(lease_s * 1000))
        self._admit = self._client.register_script(_ADMIT)
        self._done = self._client.register_script(_DONE)

    @staticmethod
    def _keys(key_id: str) -> list[str]:
        base = f"{KEY_PREFIX}:{{{key_id}}}"
        return [f"{base}:requests", f"{base}:tokens", f"{base}:inflight"]

    def admit_step(self, key_id: str, limits: KeyLimits, needed: int, slot: str) -> Step:
        rpm, tpm, concurrent = (-1 if limit is None else limit for limit in limits)
        return Step(self._admit, self._keys(key_id), [rpm, tpm, concurrent, needed, slot, self._lease_ms])

    @staticmethod
    def state_of(reply) -> _State:
        verdict, count, reset_ms, previous, current, into_ms, in_flight = reply
        return _State(
            verdict.decode(), int(count), reset_ms / 1000, int(previous), int(current), into_ms / 1000, int(in_flight)
        )

    async def admit(self, key_id: str, limits: KeyLimits, needed: int, slot: str) -> _State:
        step = self.admit_step(key_id, limits, needed, slot)
        return self.state_of(await step.script(step.keys, step.args))

    def done_step(self, key_id: str, tokens_per_minute: int | None, tokens: int, slot: str | None, refund) -> Step:
        tpm = -1 if tokens_per_minute is None else tokens_per_minute
        return Step(self._done, self._keys(key_id), [tpm, tokens, slot or "", refund or ""])

    async def done(self, key_id: str, tokens_per_minute: int | None, tokens: int, slot: str | None, refund) -> None:
        step = self.done_step(key_id, tokens_per_minute, tokens, slot, refund)
        await step.script(step.keys, step.args)

    async def close(self) -> None:
        if self._owned:
            await self._client.aclose()


class Admission:
    """An admitted request of the Redis store. The caller MUST call `done(tokens)` exactly once, or
    `refund()` when the request was refused after all, by the budget (extra calls are no-ops).
    The in-process store's LocalAdmission has the same interface; `done_now()` / `refund_now()`
    answer False here (nothing done: await the coroutine)."""

    __slots__ = ("_done", "_key_id", "_limiter", "_limits", "_member", "_slot", "headers")

    def __init__(self, limiter: RateLimiter, key_id: str, limits: KeyLimits, member: str, headers: dict) -> None:
        self.headers: dict[str, str] = headers
        self._limiter = limiter
        self._key_id = key_id
        self._limits = limits
        self._member = member  # the request in Redis' window, and its concurrency slot
        self._slot = member if limits.concurrent_requests is not None else None
        self._done = False

    def done_now(self, tokens: int) -> bool:
        return False

    def refund_now(self) -> bool:
        return False

    def done_step(self, tokens: int) -> Step | None:
        """`done()` as a Redis step to send with others (redis_steps.run); None when there is
        nothing to send. Marks the admission done either way (remote limiters only)."""
        if self._done:
            return None
        self._done = True
        if not self._anything_to_do(tokens, None):
            return None
        return self._limiter._store.done_step(self._key_id, self._limits.tokens_per_minute, tokens, self._slot, None)

    def _anything_to_do(self, tokens: int, refund: str | None) -> bool:
        """Whether there are tokens to charge, a slot to free or a request to take back."""
        return (
            refund is not None or self._slot is not None or (self._limits.tokens_per_minute is not None and tokens > 0)
        )

    async def done(self, tokens: int) -> None:
        """Charge `tokens` (prompt + completion) to the tokens-per-minute window, free the slot.

        Never raises: it runs on the way out of a request, where a store outage must not replace
        the response (a slot that could not be freed is reclaimed when its lease ends)."""
        await self._finish(tokens, None)

    async def refund(self) -> None:
        """Free the slot and take the request out of the requests-per-minute window: it was refused
        after all (its budget), so it must not use up the key's requests. Never raises."""
        await self._finish(0, self._member)

    async def _finish(self, tokens: int, refund: str | None) -> None:
        if self._done:
            return
        self._done = True
        if not self._anything_to_do(tokens, refund):
            return  # no round trip
        try:
            store = self._limiter._store
            await store.done(self._key_id, self._limits.tokens_per_minute, tokens, self._slot, refund)
        except Exception:
            log.exception("could not charge %d tokens or free the slot of key %s", tokens, self._key_id)


class RateLimiter:
    """Admits or refuses requests per API key; state in process or in a Redis shared by replicas.

    Each store takes one atomic step per admission (check every limit, count the request only if
    all admit) and one per completion; this class turns the state a step saw into the Admission
    and its headers, or into the refusal."""

    def __init__(
        self, storage_uri: str = "memory://", *, slot_lease_s: float = 600.0, client: aioredis.Redis | None = None
    ) -> None:
        """`storage_uri`: `memory://` or `redis://host:port/db` (`rediss://` for TLS).
        `slot_lease_s`: how long a concurrency slot held in Redis outlives a replica that died
        holding it; a request running longer than this stops counting against the limit.
        `client`: a Redis client to share (with the budget book: their steps can then go in one
        round trip); its owner closes it."""
        if storage_uri.startswith("memory://"):
            self._store: _MemoryStore | _RedisStore = _MemoryStore()
        elif storage_uri.startswith(("redis://", "rediss://")):
            self._store = _RedisStore(storage_uri, slot_lease_s, client)
        else:
            raise ValueError(f"unsupported rate-limit storage {storage_uri!r}: use memory:// or redis://")
        self.remote = self._store.remote  # whether its calls wait on a store

    def admit_now(self, key_id: str, limits: KeyLimits, tokens_hint: int = 0) -> Admission | LocalAdmission | None:
        """`admit()` without a coroutine, for the in-process store (what the cached path can
        afford); None when the store is remote: then await `admit()`."""
        if self.remote:
            return None
        return self._store.take(self, key_id, limits, tokens_hint)

    async def admit(self, key_id: str, limits: KeyLimits, *, tokens_hint: int = 0) -> Admission | LocalAdmission:
        """Admit one request of `key_id` or raise RATE_LIMITED naming the limit that refused it.
        A refused request is not counted and holds no slot. (`tokens_hint`: the most tokens the
        request can use; a hint of 0 is refused only when the window is exhausted.)"""
        if not self.remote:
            return self._store.take(self, key_id, limits, tokens_hint)
        slot = new_id()
        with store_errors("rate-limit"):
            state = await self._store.admit(key_id, limits, max(1, tokens_hint), slot)
        return self._decide(key_id, limits, tokens_hint, slot, state)

    def admit_step(self, key_id: str, limits: KeyLimits, *, tokens_hint: int = 0):
        """`admit()` as a Redis step to send with others (redis_steps.run), and the function that
        turns its reply into the Admission (or raises the refusal). Remote limiters only."""
        slot = new_id()
        step = self._store.admit_step(key_id, limits, max(1, tokens_hint), slot)

        def decide(reply) -> Admission:
            return self._decide(key_id, limits, tokens_hint, slot, self._store.state_of(reply))

        return step, decide

    async def close(self) -> None:
        await self._store.close()

    def _decide(self, key_id: str, limits: KeyLimits, tokens_hint: int, slot: str, state: _State) -> Admission:
        rpm, tpm, _ = limits
        if state.verdict == "ok":  # the common case, kept short: the headers are built here
            value = ""
            if tpm is not None:
                remaining, reset_s = sliding_stats(tpm, state.tokens_window())
                value = _ITEM.format("tokens", remaining, math.ceil(reset_s))
            if rpm is not None:
                item = _ITEM.format("requests", max(0, rpm - state.requests), math.ceil(state.requests_reset_s))
                value = f"{item}, {value}" if value else item
            headers = {"RateLimit": value, "RateLimit-Policy": _admitted_policy(limits)} if value else {}
            return Admission(self, key_id, limits, slot, headers)
        raise self._refusal(limits, tokens_hint, state)

    def _refusal(self, limits: KeyLimits, tokens_hint: int, state: _State) -> MeshError:
        """The RATE_LIMITED error of a step that refused, the refusing limit's item first."""
        rpm, tpm, concurrent = limits
        requests = (
            [_Window("requests", rpm, max(0, rpm - state.requests), math.ceil(state.requests_reset_s))]
            if rpm is not None
            else []
        )
        tokens = []
        if tpm is not None:
            remaining, reset_s = sliding_stats(tpm, state.tokens_window())
            tokens = [_Window("tokens", tpm, remaining, math.ceil(reset_s))]
        if state.verdict == "tokens":
            return self._tokens_refusal(tpm, tokens_hint, state, requests)
        if state.verdict == "concurrent":
            # When a slot frees is unknown: ask for a retry in a second. The item gets a 1 s
            # "window" so that huggingface_hub's message reads "0/4 requests remaining in current 1s window".
            return MeshError(
                ErrorCode.RATE_LIMITED,
                f"too many concurrent requests: this API key may have {concurrent} in flight "
                f"and has {state.in_flight}; retry after 1 s",
                retry_after_s=1,
                headers=rate_limit_headers([_Window("concurrent", concurrent, 0, 1, window_s=1), *requests, *tokens]),
            )
        # The moving window's reset is when its oldest request leaves: exactly when one fits again.
        wait = _retry_after(state.requests_reset_s)
        return MeshError(
            ErrorCode.RATE_LIMITED,
            f"rate limit reached: this API key may send {rpm} requests per minute; retry after {wait} s",
            retry_after_s=wait,
            headers=rate_limit_headers([_Window("requests", rpm, 0, wait), *tokens]),
        )

    @staticmethod
    def _tokens_refusal(limit: int, tokens_hint: int, state: _State, requests: list[_Window]) -> MeshError:
        needed = max(1, tokens_hint)
        if needed > limit:
            # No wait will ever make room: say so, and tell openai not to retry.
            return MeshError(
                ErrorCode.RATE_LIMITED,
                f"request too large: it needs about {needed} tokens, more than this API key's limit of "
                f"{limit} tokens per minute",
                retry_after_s=MAX_RETRY_AFTER_S,
                headers={
                    **rate_limit_headers([_Window("tokens", limit, 0, MAX_RETRY_AFTER_S), *requests]),
                    "x-should-retry": "false",
                },
            )
        counts = state.tokens_window()
        remaining = sliding_stats(limit, counts)[0]
        wait = _retry_after(tokens_wait_s(limit, needed, *counts))
        hint = f", this request needs about {tokens_hint}" if tokens_hint else ""
        return MeshError(
            ErrorCode.RATE_LIMITED,
            f"rate limit reached: this API key may use {limit} tokens per minute ({remaining} left{hint}); "
            f"retry after {wait} s",
            retry_after_s=wait,
            headers=rate_limit_headers([_Window("tokens", limit, 0, wait), *requests]),
        )

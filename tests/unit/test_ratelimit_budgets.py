"""Rate limits and budgets through the ControlStore, each test run on both stores: in process and
a real redis-server (and, for the store fixture, both ways a caller uses it: awaited, or the
synchronous fast path first).

Windows are never frozen: the requests window is a moving window (no boundary inside which a
burst could slip), and the tests run in milliseconds, far inside a minute. The one place where a
boundary could matter is the in-process tokens counter, whose windows are aligned on the wall
clock minute: `away_from_minute_boundary` waits out the last 2 s of a minute before such a test.
No assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from huggingface_hub.utils import parse_ratelimit_headers

from services.common.errors import ErrorCode, MeshError
from services.gateway.control.budgets import period_key
from services.gateway.control.local_store import LocalControlStore
from services.gateway.control.redis_store import RedisControlStore
from services.gateway.control.store import KeyLimits, Ticket
from services.gateway.control.windows import tokens_wait_s
from tests.helpers import free_port

RATELIMIT = re.compile(r'^"(\w+)";r=(\d+);t=(\d+)(, "\w+";r=\d+;t=\d+)*$')
POLICY = re.compile(r'^"(\w+)";q=(\d+);w=(\d+)(, "\w+";q=\d+;w=\d+)*$')


@pytest.fixture(params=["memory", "redis"])
def storage_uri(request):
    return "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")


def open_store(storage_uri: str, **options):
    if storage_uri == "memory://":
        return LocalControlStore(**options)
    return RedisControlStore(storage_uri, **options)


class NowFirst:
    """A store used as Metering uses it: the synchronous form first (`try_admit_now`,
    `try_finish_now`), awaiting the coroutine when it answers None or False. Every test of the
    `store` fixture runs both ways, so the fast path must admit, refuse, count and report exactly
    as the awaited one."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def admit(self, *args) -> Ticket:
        return self.inner.try_admit_now(*args) or await self.inner.admit(*args)

    async def finish(self, ticket: Ticket, tokens: int, cost_usd: float) -> None:
        if not self.inner.try_finish_now(ticket, tokens, cost_usd):
            await self.inner.finish(ticket, tokens, cost_usd)


@pytest.fixture(params=["awaited", "now-first"])
async def store(request, storage_uri):
    control_store = open_store(storage_uri)
    yield control_store if request.param == "awaited" else NowFirst(control_store)
    await control_store.close()


@pytest.fixture
def away_from_minute_boundary():
    if (wait := time.time() % 60 - 58) > 0:
        time.sleep(2 - wait + 0.05)


def new_key() -> str:
    return f"key-{uuid.uuid4().hex[:12]}"  # every test its own key: the Redis server is shared


async def refusal(coro) -> MeshError:
    with pytest.raises(MeshError) as caught:
        await coro
    return caught.value


# A store's two uses, spelled out: a rate-limited request (charged `tokens` when done) and a
# budget hold (settled at its cost).
def limit(store, key: str, limits: KeyLimits, *, tokens_hint: int = 0):
    return store.admit(key, limits, tokens_hint)


async def done(store, ticket: Ticket, tokens: int) -> None:
    await store.finish(ticket, tokens, 0.0)


async def reserve(store, key: str, budget_usd: float, period: str, amount_usd: float) -> Ticket:
    return await store.admit(key, None, 0, budget_usd, period, amount_usd)


async def settle(store, ticket: Ticket, cost_usd: float) -> None:
    await store.finish(ticket, 0, cost_usd)


def usd(*amounts) -> tuple[Decimal, ...]:
    """Amounts of USD as exact Decimals (what `spent()` answers), from texts or ints."""
    return tuple(Decimal(amount) for amount in amounts)


def twin(ticket: Ticket) -> Ticket:
    """The same admission as another replica would hold it (not finished there)."""
    other = copy.copy(ticket)
    other.finished = False
    return other


# -- requests per minute -----------------------------------------------------------------------------
async def test_burst_admits_exactly_the_requests_per_minute(store):
    key, limits = new_key(), KeyLimits(requests_per_minute=7)
    results = await asyncio.gather(*(limit(store, key, limits) for _ in range(20)), return_exceptions=True)
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, MeshError)]
    assert len(admitted) == 7 and len(refused) == 13
    assert all(err.code is ErrorCode.RATE_LIMITED for err in refused)
    for ticket in admitted:
        await done(store, ticket, 0)


async def test_refusal_carries_retry_after_and_ratelimit_headers_hf_can_parse(store):
    key, limits = new_key(), KeyLimits(requests_per_minute=3)
    admissions = [await limit(store, key, limits) for _ in range(3)]
    assert [a.headers["RateLimit"].split(";")[1] for a in admissions] == ["r=2", "r=1", "r=0"]
    assert admissions[0].headers["RateLimit-Policy"] == '"requests";q=3;w=60'
    err = await refusal(limit(store, key, limits))
    assert err.code is ErrorCode.RATE_LIMITED and err.code.http_status == 429
    assert 1 <= err.retry_after_s <= 120 and err.retry_after_s == int(err.retry_after_s)
    assert "3 requests per minute" in err.message
    assert err.headers["RateLimit"] == f'"requests";r=0;t={err.retry_after_s}'
    assert err.headers["RateLimit-Policy"] == '"requests";q=3;w=60'
    info = parse_ratelimit_headers(err.headers)  # what huggingface_hub prints on a 429
    assert (info.resource_type, info.remaining, info.reset_in_seconds) == ("requests", 0, err.retry_after_s)
    assert (info.limit, info.window_seconds) == (3, 60)


async def test_headers_list_every_limit_and_lead_with_the_one_that_refused(store, away_from_minute_boundary):
    key, limits = new_key(), KeyLimits(requests_per_minute=10, tokens_per_minute=100)
    admission = await limit(store, key, limits)
    assert RATELIMIT.match(admission.headers["RateLimit"]) and POLICY.match(admission.headers["RateLimit-Policy"])
    assert admission.headers["RateLimit"].startswith('"requests";r=9;t=')
    assert admission.headers["RateLimit"].split(", ")[1].startswith('"tokens";r=100;t=')
    assert admission.headers["RateLimit-Policy"] == '"requests";q=10;w=60, "tokens";q=100;w=60'
    await done(store, admission, 100)
    err = await refusal(limit(store, key, limits))
    assert err.headers["RateLimit"].startswith(f'"tokens";r=0;t={err.retry_after_s}, "requests";r=9;t=')
    assert err.headers["RateLimit-Policy"] == '"tokens";q=100;w=60, "requests";q=10;w=60'
    assert parse_ratelimit_headers(err.headers).resource_type == "tokens"


# -- tokens per minute -------------------------------------------------------------------------------
async def test_tokens_per_minute_refuses_once_charged_tokens_leave_no_room(store, away_from_minute_boundary):
    key, limits = new_key(), KeyLimits(tokens_per_minute=1000)
    first = await limit(store, key, limits, tokens_hint=600)
    await done(store, first, 600)
    err = await refusal(limit(store, key, limits, tokens_hint=500))
    assert err.code is ErrorCode.RATE_LIMITED and "1000 tokens per minute (400 left" in err.message
    assert 1 <= err.retry_after_s <= 120
    second = await limit(store, key, limits, tokens_hint=300)  # fits in what is left
    await done(store, second, 450)  # used more than it hinted: charged, up to the limit
    err = await refusal(limit(store, key, limits))  # hint 0: refused only when exhausted
    assert err.headers["RateLimit"].startswith('"tokens";r=0;')


async def test_request_larger_than_the_tokens_limit_is_refused_without_retry(store):
    err = await refusal(limit(store, new_key(), KeyLimits(tokens_per_minute=100), tokens_hint=101))
    assert err.code is ErrorCode.RATE_LIMITED and "request too large" in err.message
    assert err.headers["x-should-retry"] == "false" and err.retry_after_s == 120


def test_tokens_wait_covers_the_previous_window_decay_and_the_current_window_roll():
    assert tokens_wait_s(100, 10, 0, 0.0, 50, 90.0) == 0  # room now
    # 100 x 30/60 + 40 = 90 counted: 20 more fit once the previous window weighs 40, in 6 s
    assert tokens_wait_s(100, 20, 100, 30.0, 40, 90.0) == pytest.approx(6)
    # the current window alone is too full: it must roll (in 30 s) and decay to 90 left
    assert tokens_wait_s(100, 10, 0, 0.0, 100, 90.0) == pytest.approx(30 + 60 - 90 * 60 / 100)
    assert tokens_wait_s(100, 100, 0, 0.0, 100, 120.0) <= 120


# -- concurrency -------------------------------------------------------------------------------------
async def test_concurrency_refuses_one_more_than_the_limit_and_admits_after_done(store):
    key, limits = new_key(), KeyLimits(concurrent_requests=3)
    held = [await limit(store, key, limits) for _ in range(3)]
    err = await refusal(limit(store, key, limits))
    assert err.code is ErrorCode.RATE_LIMITED and "3 in flight" in err.message and err.retry_after_s == 1
    assert parse_ratelimit_headers(err.headers).resource_type == "concurrent"
    await done(store, held[0], 0)
    await done(store, held[0], 0)  # idempotent: frees one slot, not two
    again = await limit(store, key, limits)
    await refusal(limit(store, key, limits))
    for ticket in [*held[1:], again]:
        await done(store, ticket, 0)


async def test_a_refused_request_holds_no_concurrency_slot(store):
    key, limits = new_key(), KeyLimits(requests_per_minute=1, concurrent_requests=1)
    await done(store, await limit(store, key, limits), 0)
    for _ in range(3):  # refused by requests per minute: the slot it took is given back each time
        err = await refusal(limit(store, key, limits))
        assert "requests per minute" in err.message


async def test_done_charges_tokens_only_once(store, away_from_minute_boundary):
    key, limits = new_key(), KeyLimits(tokens_per_minute=100)
    admission = await limit(store, key, limits)
    await done(store, admission, 60)
    await done(store, admission, 60)
    assert (await limit(store, key, limits, tokens_hint=40)).headers["RateLimit"].startswith('"tokens";r=40;')


async def test_two_replicas_on_one_redis_share_every_limit(redis_url):
    replicas = [RedisControlStore(redis_url), RedisControlStore(redis_url)]
    try:
        key, limits = new_key(), KeyLimits(requests_per_minute=6)
        results = await asyncio.gather(
            *(limit(replicas[i % 2], key, limits) for i in range(10)), return_exceptions=True
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 6
        await refusal(limit(replicas[0], key, limits))
        await refusal(limit(replicas[1], key, limits))

        key, limits = new_key(), KeyLimits(concurrent_requests=2)
        held = [await limit(replicas[0], key, limits), await limit(replicas[1], key, limits)]
        await refusal(limit(replicas[1], key, limits))
        await done(replicas[0], held[0], 0)  # freed on replica 0, admitted on replica 1
        held[0] = await limit(replicas[1], key, limits)

        key, limits = new_key(), KeyLimits(tokens_per_minute=100)
        await done(replicas[0], await limit(replicas[0], key, limits), 100)
        await refusal(limit(replicas[1], key, limits))
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_slot_leaked_by_a_dead_replica_is_reclaimed_when_its_lease_ends(redis_url):
    # Two dead replicas: one whose lease cannot end during the test (its slot stays taken however slow
    # the machine is) and one whose lease ends after 0.2 s (only a lower bound on time is assumed).
    held, dead, alive = (RedisControlStore(redis_url, slot_lease_s=lease) for lease in (600, 0.2, 600))
    try:
        limits = KeyLimits(concurrent_requests=1)
        kept, leaked = new_key(), new_key()
        await limit(held, kept, limits)  # never finished: the replica "crashed"
        await refusal(limit(alive, kept, limits))
        await limit(dead, leaked, limits)  # never finished either, with a short lease
        await asyncio.sleep(0.4)
        await done(alive, await limit(alive, leaked, limits), 0)
        await refusal(limit(alive, kept, limits))  # the long lease still holds
    finally:
        for replica in (held, dead, alive):
            await replica.close()


# -- budgets -----------------------------------------------------------------------------------------
async def test_concurrent_reservations_never_overspend(store):
    key = new_key()
    results = await asyncio.gather(*(reserve(store, key, 10.0, "day", 0.30) for _ in range(50)), return_exceptions=True)
    reservations = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, MeshError)]
    assert len(reservations) == 33 and len(refused) == 17  # 33 x 0.30 = 9.90; a 34th would make 10.20
    assert all(err.code is ErrorCode.QUOTA_EXCEEDED for err in refused)
    assert await store.spent(key, "day") == usd(0, "9.90")
    for reservation in reservations:
        await settle(store, reservation, 0.10)
    assert await store.spent(key, "day") == usd("3.30", 0)
    assert (await reserve(store, key, 10.0, "day", 6.70)).reservation.amount_usd == Decimal(
        "6.70"
    )  # the rest came back
    await refusal(reserve(store, key, 10.0, "day", 0.000001))


async def test_quota_error_names_budget_spent_and_cost_and_has_no_retry_after(store):
    key = new_key()
    await settle(store, await reserve(store, key, 5.0, "month", 4.0), 3.0)
    held = await reserve(store, key, 5.0, "month", 1.0)
    err = await refusal(reserve(store, key, 5.0, "month", 1.5))
    assert err.code is ErrorCode.QUOTA_EXCEEDED and err.code.http_status == 429
    assert err.message == (
        "budget exceeded: this API key's monthly budget is $5.00; $3.00 is spent and $1.00 held by requests "
        "in flight, $1.00 is left, and this request could cost up to $1.50"
    )
    assert err.retry_after_s is None and err.headers["x-should-retry"] == "false"
    await settle(store, held, 1.0)


async def test_quota_error_retries_after_the_period_ends_when_that_is_soon(storage_uri):
    store = open_store(storage_uri, clock=lambda: datetime(2026, 12, 1, 23, 59, 30, tzinfo=UTC))
    try:
        key = new_key()
        reservation = await reserve(store, key, 1.0, "day", 1.0)
        assert reservation.reservation.period == "day:2026-12-01"
        err = await refusal(reserve(store, key, 1.0, "day", 0.5))
        assert err.retry_after_s == 30 and "x-should-retry" not in err.headers
        await settle(store, reservation, 1.0)
    finally:
        await store.close()


async def test_settle_is_idempotent_and_clamps_to_what_was_held(store):
    key = new_key()
    reservation = await reserve(store, key, 10.0, "total", 2.0)
    assert reservation.reservation.period == "total"
    await settle(store, reservation, 5.0)  # more than was held: clamped (and logged)
    await settle(store, reservation, 5.0)
    await settle(store, twin(reservation), 5.0)  # the store itself knows the hold is gone
    assert await store.spent(key, "total") == usd(2, 0)


async def test_periods_are_the_utc_day_and_month():
    now = datetime(2026, 2, 28, 23, 0, tzinfo=UTC)
    assert [period_key(p, now) for p in ("day", "month", "total")] == ["day:2026-02-28", "month:2026-02", "total"]
    with pytest.raises(ValueError):
        period_key("week", now)


async def test_two_replicas_on_one_redis_share_the_budget(redis_url):
    replicas = [RedisControlStore(redis_url), RedisControlStore(redis_url)]
    try:
        key = new_key()
        results = await asyncio.gather(
            *(reserve(replicas[i % 2], key, 10.0, "day", 0.30) for i in range(50)), return_exceptions=True
        )
        reservations = [r for r in results if not isinstance(r, BaseException)]
        assert len(reservations) == 33
        await settle(replicas[0], reservations[0], 0.0)
        await settle(replicas[1], twin(reservations[0]), 0.0)  # already settled by the other replica: no-op
        assert await replicas[1].spent(key, "day") == usd(0, "9.60")
        assert await replicas[0].spent(key, "day") == await replicas[1].spent(key, "day")
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_hold_never_settled_is_charged_in_full_when_its_lease_ends(storage_uri):
    store = open_store(storage_uri, reservation_lease_s=0.2)
    try:
        key = new_key()
        reservation = await reserve(store, key, 1.0, "day", 0.75)  # its replica "crashed"
        await asyncio.sleep(0.4)
        assert await store.spent(key, "day") == usd("0.75", 0)
        await refusal(reserve(store, key, 1.0, "day", 0.5))
        await settle(store, reservation, 0.1)  # too late: no-op
        assert await store.spent(key, "day") == usd("0.75", 0)
    finally:
        await store.close()


async def test_holds_whose_lease_ran_out_are_charged_in_full_on_the_fast_path_too():
    """In process, the fast path only looks for run-out holds once the oldest one's lease can have
    ended; holds settled in between, and holds made after, keep that right."""
    # The lease is long enough that no stall between two lines of this test outlasts it, and the
    # sleeps outlast it: only lower bounds on elapsed time are assumed.
    store = LocalControlStore(reservation_lease_s=1.0)
    key = new_key()
    settled = store.try_admit_now(key, None, 0, 1.0, "day", 0.1)
    lost = store.try_admit_now(key, None, 0, 1.0, "day", 0.3)  # its request never finishes
    assert store.try_finish_now(settled, 0, 0.05)  # the oldest hold goes: the next one is still watched
    await asyncio.sleep(1.1)
    later = store.try_admit_now(key, None, 0, 1.0, "day", 0.2)  # sweeps `lost` first: charged in full
    assert later is not None and await store.spent(key, "day") == usd("0.35", "0.2")
    with pytest.raises(MeshError, match="budget exceeded"):  # 0.35 + 0.2 + 0.5 > 1
        store.try_admit_now(key, None, 0, 1.0, "day", 0.5)
    store.try_finish_now(lost, 0, 0.0)  # too late: no-op
    assert await store.spent(key, "day") == usd("0.35", "0.2")
    await asyncio.sleep(1.1)
    assert store.try_admit_now(key, None, 0, 1.0, "day", 0.4) is not None  # `later` ran out too: 0.55 spent
    assert await store.spent(key, "day") == usd("0.55", "0.4")


async def test_an_unreachable_redis_refuses_as_retryable_unavailable():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    store = RedisControlStore(url)
    try:
        err = await refusal(limit(store, new_key(), KeyLimits(requests_per_minute=5)))
        assert err.code is ErrorCode.UPSTREAM_UNAVAILABLE and err.message == "rate-limit store is unavailable"
        err = await refusal(store.admit(new_key(), KeyLimits(5), 0, 1.0, "day", 0.1))  # the first step names it
        assert err.code is ErrorCode.UPSTREAM_UNAVAILABLE and err.message == "rate-limit store is unavailable"
        err = await refusal(reserve(store, new_key(), 1.0, "day", 0.1))
        assert err.code is ErrorCode.UPSTREAM_UNAVAILABLE and err.message == "budget store is unavailable"
        err = await refusal(store.spent(new_key(), "day"))
        assert err.code is ErrorCode.UPSTREAM_UNAVAILABLE
    finally:
        await store.close()


# -- metering: the key's admission and completion through the store ----------------------------------
def _sentiment():
    from pathlib import Path

    from services.common.catalog import Catalog

    return Catalog.load(Path(__file__).parents[2] / "catalog.yaml").get("meshserve/sentiment-minilm")


def _key(**limits):
    from services.gateway.control.keys import ApiKey

    return ApiKey(id=new_key(), name="t", scopes=("inference",), **limits)


def _principal(key):
    from services.gateway.control.auth import Principal

    return Principal(key)


async def test_a_store_failure_while_settling_still_frees_the_slot_and_answers(storage_uri, monkeypatch):
    """Finishing runs on the way out of a request that already succeeded: a budget hold that fails
    to settle is logged, the concurrency slot is still freed and the request keeps its status."""
    from services.gateway.control.metering import Metering

    entry, key = _sentiment(), _key(concurrent_requests=1, budget_usd=1.0)
    store = open_store(storage_uri)
    metering = Metering(store, None, timeout_s=1.0)
    if isinstance(store, LocalControlStore):

        def broken_settle(*args):
            raise RuntimeError("the budget's books are broken")

        monkeypatch.setattr(store, "_settle", broken_settle)
    else:  # the settlement's script fails in Redis; the release that went with it does not
        monkeypatch.setattr(
            store, "_settle_script", store._client.register_script("return redis.error_reply('broken')")
        )
    try:
        metered = await metering.admit(_principal(key), entry, "text-classification", "/t", "r1", max_input_tokens=5)
        async with metering.track(metered):
            pass  # the request succeeded; finishing must not turn it into an error
        again = await metering.admit(_principal(key), entry, "text-classification", "/t", "r2", max_input_tokens=5)
        await metering.finish(again, 200)  # the one slot was free again
    finally:
        await store.close()


async def test_the_in_process_fast_path_refuses_like_the_awaited_path_and_changes_nothing_then():
    """try_admit_now() refuses as admit() does, rate limit or budget; a refused request is not
    counted and holds nothing (a budget refusal takes the request back out of the windows)."""
    store = LocalControlStore()
    key, limits = new_key(), KeyLimits(requests_per_minute=5, concurrent_requests=1)
    first = store.try_admit_now(key, limits)
    assert first.headers["RateLimit"].startswith('"requests";r=4;')
    with pytest.raises(MeshError, match="1 in flight"):  # the one slot is taken
        store.try_admit_now(key, limits)
    err = await refusal(store.admit(key, limits))
    assert "1 in flight" in err.message
    assert store.try_finish_now(first, 0, 0.0) and store.try_finish_now(first, 0, 0.0)  # idempotent
    assert store.try_admit_now(key, limits).headers["RateLimit"].startswith('"requests";r=3;')  # 2 counted, not 3

    key = new_key()
    held = store.try_admit_now(key, limits, 0, 1.0, "day", 0.75)
    assert held.reservation is not None and await store.spent(key, "day") == usd(0, "0.75")
    with pytest.raises(MeshError, match="1 in flight"):  # the rate limit refuses first
        store.try_admit_now(key, limits, 0, 1.0, "day", 0.5)
    store.try_finish_now(held, 0, 0.25)
    with pytest.raises(MeshError) as caught:  # does not fit: nothing held, not counted, no slot taken
        store.try_admit_now(key, limits, 0, 1.0, "day", 0.8)
    assert caught.value.code is ErrorCode.QUOTA_EXCEEDED
    assert await store.spent(key, "day") == usd("0.25", 0)
    again = store.try_admit_now(key, limits, 0, 1.0, "day", 0.5)
    assert again.headers["RateLimit"].startswith('"requests";r=3;')  # the refused one was taken back


@pytest.mark.parametrize(
    "limits",
    [KeyLimits(5, 1000, 3), KeyLimits(5, None, None), KeyLimits(None, 1000, None), KeyLimits(None, None, 2)],
    ids=["all", "requests", "tokens", "concurrent"],
)
def test_in_process_admission_headers_are_the_ones_the_shared_renderer_writes(limits, monkeypatch):
    """The in-process step writes an admitted request's headers itself (the cached path cannot
    afford the shared renderer); they must be what windows.admitted_headers writes for the same
    state, the Redis store's, in every phase of the tokens counter."""
    from services.gateway.control import local_store, windows

    clock = [1_800_000_000 * 60 + 10.25]  # 10.25 s into a minute
    monkeypatch.setattr(local_store.time, "time", lambda: clock[0])
    store, key = LocalControlStore(), new_key()
    states = [
        # (seconds later, tokens this request uses): the counter empty, then this minute's count
        # only, then last minute's only (weighted by what is left of it), then both
        (0.0, 0),
        (5.5, 300),
        (60.0, 120),
        (7.75, 40),
        (36.5, 5),  # right on the next minute: nothing counted in it yet
        (0.0, 5),  # still right on it, with tokens counted in it: the reset is now
    ]
    for step, (later, uses) in enumerate(states):
        clock[0] += later
        ticket = store.try_admit_now(key, limits, 10)
        now, key_windows = clock[0], store._keys[key]
        into = now % 60
        state = windows.WindowState(
            "ok",
            len(key_windows.times),
            key_windows.times[0] + 60 - now if key_windows.times else 0.0,
            key_windows.previous if key_windows.minute == int(now // 60) else 0,
            key_windows.current if key_windows.minute == int(now // 60) else 0,
            into,
            key_windows.in_flight,
        )
        assert ticket.headers == windows.admitted_headers(limits, state), step
        store.try_finish_now(ticket, uses + 1, 0.0)


async def test_with_redis_the_fast_path_always_declines(redis_url):
    """Shared state is only ever changed by the awaited forms (their Lua scripts are atomic)."""
    store = RedisControlStore(redis_url)
    try:
        key = new_key()
        assert store.try_admit_now(key, KeyLimits(requests_per_minute=5)) is None
        assert store.try_admit_now(key, None, 0, 1.0, "day", 0.1) is None
        ticket = await store.admit(key, KeyLimits(requests_per_minute=5), 0, 1.0, "day", 0.1)
        assert not store.try_finish_now(ticket, 0, 0.05)
        assert await store.spent(key, "day") == usd(0, "0.1")  # the declined finish changed nothing
        await store.finish(ticket, 0, 0.05)
        assert await store.spent(key, "day") == usd("0.05", 0)
    finally:
        await store.close()


async def test_in_process_accounts_of_ended_periods_are_forgotten():
    """A gateway that runs for months keeps one account per key and current period, not one per
    key and every day it has seen."""
    from datetime import timedelta

    yesterday = datetime.now(UTC) - timedelta(days=1)
    today = [yesterday]
    store = LocalControlStore(clock=lambda: today[0])
    key = new_key()
    await reserve(store, key, 1.0, "month", 0.1)  # still held: kept, whatever its period
    await settle(store, await reserve(store, key, 1.0, "day", 0.1), 0.1)
    accounts = store._accounts
    old_day, old_month = (key, period_key("day", yesterday)), (key, period_key("month", yesterday))
    assert old_day in accounts and old_month in accounts
    today[0] = datetime.now(UTC)  # today: the first reservation opens today's account
    await reserve(store, key, 1.0, "day", 0.1)
    assert old_day not in accounts and old_month in accounts
    assert (key, period_key("day", datetime.now(UTC))) in accounts


async def test_a_request_its_budget_refuses_does_not_use_up_its_requests_per_minute(store):
    """Admission asks the limiter first, then the budget; a request the budget refuses is taken
    back out of the requests window, so an exhausted budget does not also exhaust the rate limit."""
    import dataclasses

    from services.gateway.control.metering import Metering

    entry = _sentiment()
    broke = _key(requests_per_minute=2, concurrent_requests=1, budget_usd=0.0, budget_period="day")
    metering = Metering(store, None, timeout_s=1.0)
    for i in range(4):
        err = await refusal(
            metering.admit(_principal(broke), entry, "text-classification", "/t", f"r{i}", max_input_tokens=5)
        )
        assert err.code is ErrorCode.QUOTA_EXCEEDED  # not RATE_LIMITED: the refusals were not counted
    funded = _principal(dataclasses.replace(broke, budget_usd=1.0))
    for i in range(2):  # the slot was given back each time, and both requests of the minute are left
        await metering.finish(
            await metering.admit(funded, entry, "text-classification", "/t", f"ok{i}", max_input_tokens=5), 200
        )
    err = await refusal(metering.admit(funded, entry, "text-classification", "/t", "third", max_input_tokens=5))
    assert err.code is ErrorCode.RATE_LIMITED and "2 requests per minute" in err.message


async def test_metering_writes_a_row_per_request_and_the_usage_headers(store):
    """One ledger row per request, refused or finished, with its status and cost; the headers
    carry the usage and the rate-limit state; a failed request costs nothing."""
    from services.gateway.control.metering import Metering

    rows = []

    class Ledger:
        append = rows.append

    entry, key = _sentiment(), _key(requests_per_minute=2, budget_usd=1.0)
    metering = Metering(store, Ledger(), timeout_s=1.0)
    metered = await metering.admit(_principal(key), entry, "text-classification", "/t", "a", max_input_tokens=5)
    async with metering.track(metered):
        metered.add(input_tokens=5, items=1)
    headers = metered.headers()
    assert headers["X-Usage-Input-Tokens"] == "5" and headers["RateLimit"].startswith('"requests";r=1;')
    cost = entry.pricing.cost(5, 0, 0.0)  # exact: 5 tokens at the catalog's price, plus the request's
    assert headers["X-Usage-Cost-USD"] == f"{cost:.9f}" and Decimal(headers["X-Usage-Cost-USD"]) == cost
    failed = await metering.admit(_principal(key), entry, "text-classification", "/t", "b", max_input_tokens=5)
    with pytest.raises(MeshError):
        async with metering.track(failed):
            failed.add(input_tokens=5)
            raise MeshError(ErrorCode.INVALID_INPUT, "bad")
    await refusal(metering.admit(_principal(key), entry, "text-classification", "/t", "c", max_input_tokens=5))
    assert [(row[0], row[9], row[10]) for row in rows] == [
        ("a", cost, 200),
        ("b", 0, 400),
        ("c", 0, 429),
    ]
    assert await store.spent(key.id, "month") == (cost, 0)


async def test_disabled_metering_admits_everything_and_records_nothing():
    from services.gateway.control.metering import Metering

    metering = Metering.disabled()
    metered = await metering.admit(
        _principal(_key(requests_per_minute=1)), _sentiment(), "t", "/t", "a", max_input_tokens=5
    )
    async with metering.track(metered):
        metered.add(input_tokens=3)
    assert metered.rate_headers() == {} and metered.headers()["X-Usage-Input-Tokens"] == "3"


# -- Redis: one round trip per phase, shared by concurrent requests ----------------------------------
@pytest.fixture
async def shared_redis(redis_url):
    """The Redis store and the Metering over it (what ControlPlane builds when a Redis URL is set)."""
    from services.gateway.control.metering import Metering

    store = RedisControlStore(redis_url)
    yield Metering(store, None, timeout_s=1.0), store, store._client
    await store.close()


def _counted_round_trips(client, monkeypatch) -> list[int]:
    """The scripts of each pipelined round trip from now on."""
    sent = []
    execute = type(client.pipeline()).execute

    async def counted(pipe, *args, **kwargs):
        sent.append(len(pipe.command_stack))
        return await execute(pipe, *args, **kwargs)

    monkeypatch.setattr(type(client.pipeline()), "execute", counted)
    return sent


async def test_with_redis_admission_and_completion_take_one_round_trip_each(shared_redis, monkeypatch):
    import dataclasses

    metering, store, client = shared_redis
    entry = _sentiment()
    key = _key(requests_per_minute=3, concurrent_requests=1, budget_usd=1.0, budget_period="day")
    sent = _counted_round_trips(client, monkeypatch)
    metered = await metering.admit(_principal(key), entry, "text-classification", "/t", "r1", max_input_tokens=5)
    assert metered.rate_headers()["RateLimit"].startswith('"requests";r=2;')
    metered.add(input_tokens=5)
    await metering.finish(metered, 200)
    assert sent == [2, 2]  # two scripts per round trip, one round trip per phase
    spent, reserved = await store.spent(key.id, "day")
    assert spent == entry.pricing.cost(5, 0, 0.0) and reserved == 0  # exact, to the nano-dollar
    # The slot was freed: the next request is admitted (concurrency 1).
    await metering.finish(
        await metering.admit(_principal(key), entry, "text-classification", "/t", "r2", max_input_tokens=5), 200
    )
    # Over the rate limit: refused by the limiter, and the budget step that went with it is undone.
    await metering.finish(
        await metering.admit(_principal(key), entry, "text-classification", "/t", "r3", max_input_tokens=5), 200
    )
    err = await refusal(metering.admit(_principal(key), entry, "text-classification", "/t", "r4", max_input_tokens=5))
    assert err.code is ErrorCode.RATE_LIMITED
    assert (await store.spent(key.id, "day"))[1] == 0  # nothing left held
    # Over budget: refused by the budget; the request is taken back out of the limiter's window.
    broke = _principal(dataclasses.replace(key, id=new_key(), budget_usd=0.0))
    for i in range(5):
        err = await refusal(metering.admit(broke, entry, "text-classification", "/t", f"b{i}", max_input_tokens=5))
        assert err.code is ErrorCode.QUOTA_EXCEEDED


async def test_a_redis_that_lost_its_scripts_loads_them_again(shared_redis):
    metering, store, client = shared_redis
    entry, key = _sentiment(), _key(requests_per_minute=5, budget_usd=1.0)
    await metering.finish(
        await metering.admit(_principal(key), entry, "text-classification", "/t", "a", max_input_tokens=5), 200
    )
    await client.script_flush()  # what a restarted Redis looks like
    metered = await metering.admit(_principal(key), entry, "text-classification", "/t", "b", max_input_tokens=5)
    assert metered.rate_headers()["RateLimit"].startswith('"requests";r=3;')
    await metering.finish(metered, 200)
    assert (await store.spent(key.id, "month"))[1] == 0


@pytest.mark.parametrize("budget", [1.0, None], ids=["limits-and-budget", "limits-only"])
async def test_concurrent_requests_share_round_trips_and_each_gets_its_own_answer(shared_redis, monkeypatch, budget):
    """While one round trip is out, the steps of the requests that come meanwhile wait and go
    together in the next one: a burst of 20 against 10 requests a minute takes a few round trips,
    not 30, and still admits exactly 10."""
    metering, store, client = shared_redis
    sent = _counted_round_trips(client, monkeypatch)
    entry, key = _sentiment(), _key(requests_per_minute=10, budget_usd=budget)

    async def one(i: int):
        try:
            metered = await metering.admit(
                _principal(key), entry, "text-classification", "/t", f"r{i}", max_input_tokens=5
            )
        except MeshError as err:
            return err.code
        metered.add(input_tokens=5)
        await metering.finish(metered, 200)
        return "ok"

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert results.count("ok") == 10 and results.count(ErrorCode.RATE_LIMITED) == 10
    # Every admission's steps and each finish's settlement (this key holds no slot and counts no
    # tokens: the limiter has nothing to finish), in a few round trips where up to 30 went before.
    # (Undoing a refused request's budget step is not batched: it goes alone, after the refusal.)
    if budget is None:
        assert sum(sent) == 20 and len(sent) < 5, sent
        return
    assert sum(sent) == 20 * 2 + 10 and len(sent) < 10, sent
    spent, reserved = await store.spent(key.id, "month")
    assert reserved == 0 and spent == 10 * entry.pricing.cost(5, 0, 0.0)


async def test_a_failed_round_trip_fails_only_its_own_requests(shared_redis, monkeypatch):
    import redis.asyncio as aioredis

    from services.common.ids import new_id
    from services.gateway.control import redis_steps

    _, store, client = shared_redis
    batcher = redis_steps.Batcher(client)
    key = new_key()
    step = lambda: store.rate_step(key, KeyLimits(requests_per_minute=100), 0, new_id())  # noqa: E731
    real, calls = redis_steps.run, []

    async def flaky(client, steps):
        calls.append(len(steps))
        if len(calls) == 2:  # the second round trip: the requests that waited for the first
            raise aioredis.ConnectionError("connection reset")
        return await real(client, steps)

    monkeypatch.setattr(redis_steps, "run", flaky)
    first = asyncio.ensure_future(batcher.run([step()]))
    await asyncio.sleep(0)  # out: the next ones wait for it
    waiting = [asyncio.ensure_future(batcher.run([step(), step()])) for _ in range(3)]
    cancelled = asyncio.ensure_future(batcher.run([step()]))
    await asyncio.sleep(0)
    cancelled.cancel()
    assert len(await first) == 1
    for future in waiting:
        with pytest.raises(aioredis.ConnectionError):
            await future
    assert calls == [1, 6]  # the cancelled caller's step was never sent
    assert len(await batcher.run([step()])) == 1  # and the next round trip works

"""Killing one of two providers of a model under load (c = 16), through a gateway process and two
fake upstream processes: no unary request fails and no stream fails that had not started; a stream
that had started on the killed provider ends with an OpenAI error event (never a cut body); the
ledger has exactly one row per request the gateway answered."""

from __future__ import annotations

import os
import signal

import pytest

from tests.providers.conftest import (
    Outcome,
    bounded_load,
    openai_provider,
    post_one,
    start_provider_gateway,
    stream_one,
    write_providers,
)

pytestmark = pytest.mark.xdist_group("providers-kill")

N, C = 80, 16  # half of the requests come after the SIGKILL: enough to see every one fail over
KILL_AFTER = 40  # acknowledged answers before the SIGKILL: a count, not a time
CHAT = "acme/kill-chat"
EMBED = "acme/kill-embed"
TOKENS = 12


@pytest.fixture
def victim_pair(fakes, tmp_path):
    """fake-v (first in `preferred` order: it takes the load until it dies) and fake-w."""

    def start(**fake_kw):
        v, w = fakes["start"]("fake-v", **fake_kw), fakes["start"]("fake-w")
        models = {
            CHAT: {"upstream": CHAT, "tasks": ["text-generation"]},
            EMBED: {"upstream": EMBED, "tasks": ["feature-extraction"]},
        }
        providers = [openai_provider("fake-v", v.url + "/v1", models), openai_provider("fake-w", w.url + "/v1", models)]
        gateway = start_provider_gateway(tmp_path, write_providers(tmp_path / "providers.yaml", providers))
        started.append(gateway)
        return gateway, v, w

    started = []
    yield start
    for gateway in started:
        gateway.stop()


def kill_after(fake, count: int):
    """A callback for each acknowledged answer: SIGKILL `fake` (by PID) at the count-th."""
    seen = [0]

    def tick() -> None:
        seen[0] += 1
        if seen[0] == count:
            os.kill(fake.pid, signal.SIGKILL)

    return tick


def assert_one_row_per_answer(gateway, outcomes: list[Outcome]) -> list[dict]:
    rows = gateway.ledger_rows()
    answered = [o.request_id for o in outcomes if o.status != 0]
    assert len(rows) == len(answered), (len(rows), len(answered))
    assert sorted(r["request_id"] for r in rows) == sorted(answered)
    return rows


def test_killing_one_provider_loses_no_unary_request(victim_pair):
    gateway, v, _ = victim_pair(latency_ms=100)  # requests stay in flight at fake-v when it dies
    tick = kill_after(v, KILL_AFTER)

    async def one(client, i: int) -> Outcome:
        if i % 2:
            body = {"model": CHAT, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4}
            outcome = await post_one(client, gateway.url + "/v1/chat/completions", body)
        else:
            outcome = await post_one(client, gateway.url + "/v1/embeddings", {"model": EMBED, "input": [f"t{i}"]})
        if outcome.ok:
            tick()
        return outcome

    outcomes = bounded_load(N, C, one)
    failed = [o for o in outcomes if not o.ok]
    assert not failed, failed[:3]
    assert v.proc.poll() == -signal.SIGKILL
    providers = {o.provider for o in outcomes}
    assert providers == {"fake-v", "fake-w"}, providers
    rows = assert_one_row_per_answer(gateway, outcomes)
    assert {r["status"] for r in rows} == {200}
    # The requests in flight at fake-v when it died were answered by fake-w on a later attempt.
    assert any(r["attempts"] >= 2 and r["provider"] == "fake-w" for r in rows)


def test_killing_one_provider_mid_stream_ends_started_streams_with_an_error_event(victim_pair):
    gateway, v, _ = victim_pair()
    v.control(tokens_per_s=30)  # a stream takes ~0.4 s: its first event arrives long before its last
    done = [0]
    body = {"model": CHAT, "messages": [{"role": "user", "content": "stream please"}], "max_tokens": TOKENS,
            "stream": True}  # fmt: skip

    def first_event(outcome: Outcome) -> None:
        """SIGKILL fake-v (by PID) as soon as one of its streams has begun after KILL_AFTER have ended:
        a count and an event, not a time, so at least that stream is cut however slow the host is."""
        if done[0] >= KILL_AFTER and outcome.provider == "fake-v" and v.proc.poll() is None:
            os.kill(v.pid, signal.SIGKILL)

    async def one(client, i: int) -> Outcome:
        outcome = await stream_one(client, gateway.url + "/v1/chat/completions", body, on_first=first_event)
        if outcome.events and outcome.events[-1] == "[DONE]":
            done[0] += 1
        return outcome

    outcomes = bounded_load(N, C, one)
    assert [o for o in outcomes if o.status != 200] == []  # no stream failed before it started
    done = [o for o in outcomes if o.events and o.events[-1] == "[DONE]"]
    broken = [o for o in outcomes if o not in done]
    for o in broken:  # started on fake-v, cut by its death: an error event ends the body
        last = o.events[-1] if o.events else None
        assert isinstance(last, dict) and "error" in last and "[DONE]" not in o.events, o.events[-3:]
        assert o.provider == "fake-v"
        assert any(e.get("choices") for e in o.events[:-1] if isinstance(e, dict)), "an error before any token"
    assert 0 < len(broken) <= C, len(broken)  # the streams in progress at fake-v when it died
    assert len(done) + len(broken) == N
    assert any(o.provider == "fake-w" for o in done), "no stream failed over to fake-w"
    rows = assert_one_row_per_answer(gateway, outcomes)
    by_id = {r["request_id"]: r for r in rows}
    for o in broken:  # the tokens the client received are billed, no more (the fake: a token a chunk)
        delivered = sum(1 for e in o.events[:-1] for c in e.get("choices", []) if c.get("delta", {}).get("content"))
        assert by_id[o.request_id]["output_tokens"] == delivered, (delivered, by_id[o.request_id])

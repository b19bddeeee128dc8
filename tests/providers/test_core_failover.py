"""The attempt loop with scripted async calls: what is retried, what goes back to the caller,
Retry-After cooling, explicit providers, and the attempt and time budgets (counts, never durations)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.common.catalog import Catalog
from services.common.errors import ErrorCode, MeshError
from services.common.settings import REPO_ROOT
from services.gateway.providers import Providers
from services.gateway.providers.config import ProvidersConfig
from services.gateway.providers.registry import ProviderRegistry
from services.gateway.providers.types import Candidate, UpstreamError

CHAT = "meshserve/tiny-llama-chat"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load(Path(REPO_ROOT / "catalog.yaml"))


def _providers(catalog: Catalog, **routing) -> Providers:
    remote = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "models": {CHAT: None}}
    config = {
        "routing": {"policy": "preferred", "backoff_base_s": 0.0, **routing},
        "providers": [{"name": "local", "kind": "local"}, {"name": "mesh-b", **remote}, {"name": "mesh-c", **remote}],
    }
    registry = ProviderRegistry(ProvidersConfig.model_validate(config), catalog)
    return Providers(registry.config, registry, {})  # no upstream clients: the calls are scripted


class Script:
    """Per provider, what each call does: a result, an exception, or a coroutine to await."""

    def __init__(self, **plans) -> None:
        self.plans = {name.replace("_", "-"): list(plan) for name, plan in plans.items()}
        self.calls: Counter[str] = Counter()

    async def __call__(self, c: Candidate) -> str:
        self.calls[c.provider] += 1
        plan = self.plans[c.provider]
        step = plan.pop(0) if len(plan) > 1 else plan[0]
        if isinstance(step, BaseException):
            raise step
        if asyncio.iscoroutinefunction(step):
            return await step()
        return step


def _down(status: int = 503, **kw) -> UpstreamError:
    return UpstreamError(f"upstream said {status}", status=status, retryable=True, **kw)


async def _run(providers: Providers, script: Script, provider: str | None = None, deadline_s: float = 60.0):
    selection = providers.registry.candidates(CHAT, "chat", provider=provider)
    return await providers.attempt(selection, script, deadline=time.monotonic() + deadline_s, op="chat")


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_retryable_failure_fails_over(catalog):
    providers = _providers(catalog)
    script = Script(local=[_down(503)], mesh_b=["from b"], mesh_c=["from c"])
    retried = _metric("meshserve_provider_attempts_total", provider="local", model=CHAT, outcome="retried")
    failovers = _metric("meshserve_provider_failovers_total", model=CHAT)
    result, chosen, attempts = await _run(providers, script)
    assert _metric("meshserve_provider_attempts_total", provider="local", model=CHAT, outcome="retried") == retried + 1
    assert _metric("meshserve_provider_failovers_total", model=CHAT) == failovers + 1
    assert (result, chosen.provider) == ("from b", "mesh-b")
    assert [(a.provider, a.outcome, a.status) for a in attempts] == [("local", "retried", 503), ("mesh-b", "ok", 200)]
    assert providers.stats.sample("local", CHAT).error_rate > 0
    assert script.calls == {"local": 1, "mesh-b": 1}


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, ErrorCode.INVALID_INPUT), (422, ErrorCode.INVALID_INPUT), (413, ErrorCode.PAYLOAD_TOO_LARGE)],
)
async def test_client_error_goes_back_at_once(catalog, status, code):
    providers = _providers(catalog, breaker={"failures": 1})
    error = UpstreamError("max_tokens must be positive", status=status, retryable=False)
    script = Script(local=[error], mesh_b=["from b"], mesh_c=["from c"])
    with pytest.raises(MeshError) as info:
        await _run(providers, script)
    assert info.value.code is code and info.value.message == "max_tokens must be positive"
    assert script.calls == {"local": 1}
    assert providers.breakers.state("local", CHAT) == "closed"  # the caller's error is no provider failure


async def test_local_mesh_errors_fail_over_only_when_they_are_outages(catalog):
    providers = _providers(catalog)
    script = Script(local=[MeshError(ErrorCode.OVERLOADED, "busy")], mesh_b=["from b"], mesh_c=["from c"])
    assert (await _run(providers, script))[1].provider == "mesh-b"
    script = Script(
        local=[MeshError(ErrorCode.INVALID_INPUT, "bad", param="messages")], mesh_b=["from b"], mesh_c=["c"]
    )
    with pytest.raises(MeshError) as info:
        await _run(providers, script)
    assert info.value.code is ErrorCode.INVALID_INPUT and info.value.param == "messages"
    assert script.calls == {"local": 1}


async def test_retry_after_cools_the_provider_not_its_breaker(catalog):
    providers = _providers(catalog, breaker={"failures": 1}, max_retry_after_s=60)
    script = Script(local=[_down(429, retry_after=30.0)], mesh_b=["from b"], mesh_c=["from c"])
    assert (await _run(providers, script))[1].provider == "mesh-b"
    assert providers.breakers.state("local", CHAT) == "closed"
    assert providers.registry.cooled_for("local", CHAT) > 0
    # cooled: the next request does not try it while another candidate is left
    script = Script(local=["from local"], mesh_b=["from b"], mesh_c=["from c"])
    assert (await _run(providers, script))[1].provider == "mesh-b"
    assert script.calls["local"] == 0


async def test_long_retry_after_counts_as_down(catalog):
    providers = _providers(catalog, breaker={"failures": 1}, max_retry_after_s=1)
    script = Script(local=[_down(429, retry_after=600.0)], mesh_b=["from b"], mesh_c=["from c"])
    await _run(providers, script)
    assert providers.breakers.state("local", CHAT) == "open"
    assert providers.registry.cooled_for("local", CHAT) == 0


async def test_cooled_last_candidate_is_waited_for(catalog):
    providers = _providers(catalog)
    script = Script(mesh_b=[_down(429, retry_after=0.01), "from b"])
    result, _chosen, attempts = await _run(providers, script, provider="mesh-b")
    assert result == "from b" and [a.outcome for a in attempts] == ["retried", "ok"]


async def test_explicit_provider_never_fails_over(catalog):
    providers = _providers(catalog, max_attempts=3, breaker={"failures": 10})
    script = Script(local=["from local"], mesh_b=[_down(502)], mesh_c=["from c"])
    with pytest.raises(MeshError) as info:
        await _run(providers, script, provider="mesh-b")
    assert info.value.code is ErrorCode.UPSTREAM_UNAVAILABLE
    assert info.value.message.startswith("all 3 attempts failed: mesh-b: 502")
    assert script.calls == {"mesh-b": 3}


async def test_all_rate_limited_is_rate_limited_with_retry_after(catalog):
    providers = _providers(catalog, max_attempts=3, max_retry_after_s=60)
    script = Script(local=[_down(429, retry_after=20.0)], mesh_b=[_down(429, retry_after=7.0)], mesh_c=[_down(429)])
    with pytest.raises(MeshError) as info:
        await _run(providers, script)
    assert info.value.code is ErrorCode.RATE_LIMITED and info.value.retry_after_s == 7.0
    assert script.calls == {"local": 1, "mesh-b": 1, "mesh-c": 1}


async def test_attempts_are_capped_across_providers(catalog):
    providers = _providers(catalog, max_attempts=2)
    script = Script(local=[_down()], mesh_b=[_down()], mesh_c=["from c"])
    with pytest.raises(MeshError) as info:
        await _run(providers, script)
    assert info.value.message.startswith("all 2 attempts failed: local: 503")
    assert script.calls == {"local": 1, "mesh-b": 1}


async def test_time_budget_ends_a_hung_attempt(catalog):
    providers = _providers(catalog, budget_s=0.05)

    async def hang() -> str:
        await asyncio.sleep(60)
        return "never"

    script = Script(local=[hang], mesh_b=["from b"], mesh_c=["from c"])
    with pytest.raises(MeshError) as info:
        await _run(providers, script)
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert script.calls == {"local": 1}


async def test_open_breakers_are_skipped_and_never_tried_last(catalog):
    providers = _providers(catalog, breaker={"failures": 1, "open_s": 60})
    providers.breakers.failure("local", CHAT)
    script = Script(local=["from local"], mesh_b=["from b"], mesh_c=["from c"])
    assert (await _run(providers, script))[1].provider == "mesh-b"
    providers.breakers.failure("mesh-b", CHAT)
    providers.breakers.failure("mesh-c", CHAT)
    with pytest.raises(MeshError) as info:
        await _run(providers, script)
    assert info.value.code is ErrorCode.UPSTREAM_UNAVAILABLE and info.value.retry_after_s > 0
    assert script.calls == {"mesh-b": 1}


async def test_saturated_gate_is_a_last_resort(catalog):
    providers = _providers(catalog, max_attempts=2)
    for _ in range(64):
        assert providers.gates.try_enter("mesh-b")
    script = Script(local=[_down()], mesh_b=["from b"], mesh_c=["from c"])
    assert (await _run(providers, script))[1].provider == "mesh-c"
    script = Script(mesh_b=["from b"])
    assert (await _run(providers, script, provider="mesh-b"))[1].provider == "mesh-b"
    assert providers.gates.in_flight("mesh-b") == 64


async def _hang() -> str:
    await asyncio.sleep(60)
    return "never"


@pytest.mark.parametrize("limit", [{"budget_s": 0.05}, {"deadline_s": 0.05}])
async def test_request_out_of_time_is_no_provider_failure(catalog, limit):
    providers = _providers(catalog, breaker={"failures": 1}, budget_s=limit.get("budget_s", 30))
    script = Script(local=[_hang], mesh_b=["from b"], mesh_c=["from c"])
    with pytest.raises(MeshError) as info:
        await _run(providers, script, deadline_s=limit.get("deadline_s", 60))
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert script.calls == {"local": 1}  # the loop stopped
    assert providers.breakers.state("local", CHAT) == "closed"  # no breaker failure (failures=1 would open)
    assert providers.stats.sample("local", CHAT) is None  # no error sample


@pytest.mark.parametrize("bug", [KeyError("k"), TypeError("t"), AttributeError("a")])
async def test_gateway_bug_is_raised_at_once_not_failed_over(catalog, bug):
    providers = _providers(catalog, breaker={"failures": 1})
    script = Script(local=[bug], mesh_b=["from b"], mesh_c=["from c"])
    with pytest.raises(type(bug)):
        await _run(providers, script)
    assert script.calls == {"local": 1}
    assert providers.breakers.state("local", CHAT) == "closed"
    assert providers.stats.sample("local", CHAT) is None


async def test_connection_errors_are_provider_failures(catalog):
    providers = _providers(catalog)
    script = Script(local=[ConnectionRefusedError("refused")], mesh_b=["from b"], mesh_c=["from c"])
    assert (await _run(providers, script))[1].provider == "mesh-b"


async def _half_open(providers: Providers, provider: str) -> None:
    providers.breakers.failure(provider, CHAT)
    for _ in range(500):  # bounded: open_s is 0.02
        if providers.breakers.state(provider, CHAT) == "half_open":
            return
        await asyncio.sleep(0.005)
    raise AssertionError("breaker never went half-open")


class _Stop(BaseException):
    """A BaseException other than CancelledError (as KeyboardInterrupt or SystemExit are)."""


async def test_probe_slot_comes_back_after_any_base_exception(catalog):
    providers = _providers(catalog, breaker={"failures": 1, "open_s": 0.02, "half_open_probes": 1})
    await _half_open(providers, "mesh-b")
    with pytest.raises(_Stop):
        await _run(providers, Script(mesh_b=[_Stop()]), provider="mesh-b")
    assert providers.breakers.allow("mesh-b", CHAT)  # the probe slot was given back, not leaked
    assert providers.gates.in_flight("mesh-b") == 0


async def test_long_retry_after_opens_the_breaker_at_once(catalog):
    providers = _providers(catalog, breaker={"failures": 5}, max_retry_after_s=10)
    for status in (429, 503):
        script = Script(local=[_down(status, retry_after=600.0)], mesh_b=["from b"], mesh_c=["from c"])
        assert (await _run(providers, script))[1].provider == "mesh-b"
        assert providers.breakers.state("local", CHAT) == "open"  # down: one answer is enough
        providers.breakers.success("local", CHAT)


async def test_held_gate_slot_is_left_when_the_stream_ends(catalog):
    providers = _providers(catalog)
    selection = providers.registry.candidates(CHAT, "chat", provider="mesh-b")
    deadline = time.monotonic() + 60
    result, chosen, _attempts = await providers.attempt(selection, Script(mesh_b=["b"]), deadline=deadline, op="chat")
    assert result == "b"
    assert chosen.provider == "mesh-b" and providers.gates.in_flight("mesh-b") == 0
    got = await providers.attempt(selection, Script(mesh_b=["b"]), deadline=deadline, op="chat", hold=True)
    assert got[0] == "b" and providers.gates.in_flight("mesh-b") == 1  # the stream holds its slot
    leave = got[3]
    leave()
    leave()  # idempotent
    assert providers.gates.in_flight("mesh-b") == 0
    failing = Script(mesh_b=[_down(503), _down(503), _down(503)])
    with pytest.raises(MeshError):
        await providers.attempt(selection, failing, deadline=deadline, op="chat", hold=True)
    assert providers.gates.in_flight("mesh-b") == 0  # failed attempts never hold


SPANS_SCRIPT = """
import asyncio, json, time
from pathlib import Path
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
from services.common.catalog import Catalog
from services.gateway.providers import Providers
from services.gateway.providers.config import ProvidersConfig
from services.gateway.providers.registry import ProviderRegistry
from services.gateway.providers.types import UpstreamError
CHAT = "meshserve/tiny-llama-chat"
config = {"routing": {"policy": "preferred", "backoff_base_s": 0}, "providers": [{"name": "mesh-b", "kind": "openai",
          "base_url": "http://127.0.0.1:9/v1", "models": {CHAT: None}}]}
registry = ProviderRegistry(ProvidersConfig.model_validate(config), Catalog.load(Path("catalog.yaml")))
providers = Providers(registry.config, registry, {})
async def call(c):
    if c.provider == "local":
        raise UpstreamError("down", status=503, retryable=True)
    return trace.get_current_span().get_span_context().span_id
async def main():
    selection = registry.candidates(CHAT, "chat")
    span_id, _c, _a = await providers.attempt(selection, call, deadline=time.monotonic() + 30, op="chat")
    spans = [{"name": s.name, "id": s.context.span_id, **dict(s.attributes)} for s in exporter.get_finished_spans()]
    print(json.dumps({"inner": span_id, "spans": spans}))
asyncio.run(main())
"""


def test_each_attempt_has_its_span_and_the_call_runs_inside_it():
    # A process of its own: the global tracer provider can be set once, and other tests run untraced.
    out = subprocess.run(
        [sys.executable, "-c", SPANS_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    spans = got["spans"]
    assert [s["name"] for s in spans] == ["provider.attempt", "provider.attempt"]
    assert [(s["meshserve.provider"], s["meshserve.attempt"], s["meshserve.outcome"]) for s in spans] == [
        ("local", 1, "retried"),
        ("mesh-b", 2, "ok"),
    ]
    assert [s["http.response.status_code"] for s in spans] == [503, 200]
    assert got["inner"] == spans[1]["id"]  # the upstream call's traceparent is the attempt's span

"""Selection: parsing model suffixes, candidate filtering and the policies' order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from services.common.catalog import Catalog
from services.common.errors import ErrorCode, MeshError
from services.common.settings import REPO_ROOT
from services.gateway.providers.config import ProvidersConfig
from services.gateway.providers.registry import ProviderRegistry, local_only

CHAT = "meshserve/tiny-llama-chat"
EMBED = "sentence-transformers/all-MiniLM-L6-v2"


def _price(out: float, inp: float = 0.0) -> dict:
    return {"output_per_1k_tokens_usd": out, "input_per_1k_tokens_usd": inp}


CONFIG = {
    "routing": {"policy": "preferred", "probe_after_s": 60},
    "providers": [
        {"name": "mesh-b", "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "pricing": _price(0.0001),
         "models": {CHAT: "tinylm", "acme/remote-chat": {"tasks": ["text-generation"]}}},
        {"name": "mesh-c", "kind": "tgi", "base_url": "http://127.0.0.1:10", "pricing": _price(0.01),
         "models": {CHAT: None}},
        {"name": "tei-1", "kind": "tei", "base_url": "http://127.0.0.1:11", "models": {EMBED: None}},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load(Path(REPO_ROOT / "catalog.yaml"))


def _registry(catalog: Catalog, config: dict | None = None) -> ProviderRegistry:
    return ProviderRegistry(ProvidersConfig.model_validate(CONFIG if config is None else config), catalog)


def _order(registry: ProviderRegistry, model: str, op: str, **kw) -> list[str]:
    return [c.provider for c in registry.candidates(model, op, **kw).candidates]


def test_parse_suffixes(catalog):
    r = _registry(catalog)
    assert r.parse(CHAT) == (CHAT, None, None)
    assert r.parse(f"{CHAT}:mesh-b") == (CHAT, "mesh-b", None)
    assert r.parse(f"{CHAT}:cheapest") == (CHAT, None, "cheapest")
    assert r.parse(f"{CHAT}:auto") == (CHAT, None, "preferred")
    assert r.parse("acme/remote-chat") == ("acme/remote-chat", None, None)
    with pytest.raises(MeshError) as info:
        r.parse(f"{CHAT}:nowhere")
    assert info.value.code is ErrorCode.INVALID_INPUT and "mesh-b" in info.value.message
    assert info.value.param == "model"
    with pytest.raises(MeshError) as info:
        r.parse("acme/absent:mesh-b")
    assert info.value.code is ErrorCode.MODEL_NOT_FOUND


def test_candidates_serve_the_op(catalog):
    r = _registry(catalog)
    assert _order(r, CHAT, "chat") == ["local", "mesh-b", "mesh-c"]
    assert _order(r, EMBED, "embed") == ["local", "tei-1"]
    assert _order(r, EMBED, "task") == ["local"]  # tei serves no raw HF task
    assert _order(r, "acme/remote-chat", "completion") == ["mesh-b"]
    with pytest.raises(MeshError) as info:
        r.candidates("acme/remote-chat", "embed")
    assert info.value.code is ErrorCode.UNSUPPORTED_TASK


def test_local_only_without_remote_providers(catalog):
    r = _registry(catalog, {})
    selection = r.candidates(CHAT, "chat")
    assert local_only(selection) and not selection.explicit
    assert r.candidates(CHAT, "chat") is selection  # built once


def test_explicit_provider_and_key_restrictions(catalog):
    r = _registry(catalog)
    selection = r.candidates(CHAT, "chat", provider="mesh-c")
    assert selection.explicit and [c.upstream_model for c in selection.candidates] == [CHAT]
    assert r.candidates(CHAT, "chat", provider="mesh-b").candidates[0].upstream_model == "tinylm"
    with pytest.raises(MeshError) as info:
        r.candidates(CHAT, "chat", provider="tei-1")
    assert info.value.code is ErrorCode.INVALID_INPUT and "mesh-b" in info.value.message
    with pytest.raises(MeshError) as info:
        r.candidates(EMBED, "task", provider="tei-1")
    assert info.value.code is ErrorCode.UNSUPPORTED_TASK
    assert _order(r, CHAT, "chat", allowed=frozenset({"mesh-c", "local"})) == ["local", "mesh-c"]
    with pytest.raises(MeshError) as info:
        r.candidates(CHAT, "chat", allowed=frozenset({"tei-1"}))
    assert info.value.code is ErrorCode.PERMISSION_DENIED and "tei-1" in info.value.message
    with pytest.raises(MeshError) as info:
        r.candidates(CHAT, "chat", provider="mesh-b", allowed=frozenset({"local"}))
    assert info.value.code is ErrorCode.PERMISSION_DENIED


def test_cheapest_follows_prices(catalog):
    r = _registry(catalog)
    # local's catalog price is 0.0002 per 1k output tokens: between mesh-b (0.0001) and mesh-c (0.01).
    assert _order(r, CHAT, "chat", policy="cheapest") == ["mesh-b", "local", "mesh-c"]
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["providers"][0]["models"][CHAT] = {"upstream": "tinylm", "pricing": _price(0.5)}
    assert _order(_registry(catalog, config), CHAT, "chat", policy="cheapest") == ["local", "mesh-c", "mesh-b"]


def test_cheapest_counts_compute_second_prices(catalog):
    # Priced only per compute second: not free. A representative request (1k in, 1k out, 1 s)
    # costs mesh-b 1.0, mesh-c 0.01, local 0.0003.
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["providers"][0]["models"][CHAT] = {"upstream": "tinylm", "pricing": {"per_compute_second_usd": 1.0}}
    assert _order(_registry(catalog, config), CHAT, "chat", policy="cheapest") == ["local", "mesh-c", "mesh-b"]


def _measure(r: ProviderRegistry, ttft: dict[str, float], times: int = 1) -> None:
    for _ in range(times):
        for provider, seconds in ttft.items():
            r.stats.record(provider, CHAT, ok=True, latency_s=seconds, ttft_s=seconds)


def test_fastest_follows_ewma_and_moves_within_a_few_samples(catalog):
    r = _registry(catalog)
    _measure(r, {"local": 0.05, "mesh-b": 0.02, "mesh-c": 0.2})
    assert _order(r, CHAT, "chat", policy="fastest") == ["mesh-b", "local", "mesh-c"]
    moves = 0
    while _order(r, CHAT, "chat", policy="fastest")[0] != "local":
        _measure(r, {"mesh-b": 0.5})  # mesh-b got slow
        moves += 1
        assert moves <= 5
    assert moves >= 1


def test_fastest_weighs_errors(catalog):
    r = _registry(catalog)
    _measure(r, {"local": 0.05, "mesh-b": 0.03, "mesh-c": 0.2})
    r.stats.record("mesh-b", CHAT, ok=False, latency_s=0.001)
    assert _order(r, CHAT, "chat", policy="fastest")[0] == "local"


def test_unmeasured_and_stale_providers_are_probed_once(catalog):
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["routing"]["probe_after_s"] = 1
    r = _registry(catalog, config)
    _measure(r, {"local": 0.01, "mesh-b": 0.5})
    assert _order(r, CHAT, "chat", policy="fastest")[0] == "mesh-c"  # never measured: probed
    assert _order(r, CHAT, "chat", policy="fastest") == ["local", "mesh-b", "mesh-c"]  # once
    stale = r.stats.sample("mesh-b", CHAT)
    stale.last_at = stale.probed_at = time.monotonic() - 2  # mesh-b unmeasured for 2 s
    assert _order(r, CHAT, "chat", policy="fastest")[0] == "mesh-b"
    assert _order(r, CHAT, "chat", policy="fastest")[0] == "local"


def test_unhealthy_candidates_move_to_the_end(catalog):
    r = _registry(catalog)
    for _ in range(r.routing.breaker.failures):
        r.breakers.failure("local", CHAT)
    assert _order(r, CHAT, "chat") == ["mesh-b", "mesh-c", "local"]
    r.cool("mesh-b", CHAT, time.monotonic() + 30)
    assert _order(r, CHAT, "chat") == ["mesh-c", "local", "mesh-b"]  # the unhealthy keep their order
    listing = {m["id"]: m for m in r.models()}
    status = {p["provider"]: p["status"] for p in listing[CHAT]["providers"]}
    assert status == {"local": "error", "mesh-b": "cooling", "mesh-c": "live"}
    assert [p["provider"] for p in listing[CHAT]["providers"] if p["is_default"]] == ["mesh-c"]


def test_models_lists_remote_models_with_prices(catalog):
    r = _registry(catalog)
    listing = {m["id"]: m for m in r.models()}
    remote = listing["acme/remote-chat"]
    assert remote["tasks"] == ["text-generation"] and remote["owned_by"] == "acme"
    assert remote["providers"][0]["pricing"] == {"input": 0.0, "output": pytest.approx(0.1)}
    assert r.model("acme/remote-chat").default_task == "text-generation"
    assert r.model(CHAT).id == CHAT

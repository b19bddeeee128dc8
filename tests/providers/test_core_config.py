"""providers.yaml parsing: shorthand model values, name rules, and errors that name the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.providers.config import load_providers

GOOD = """
routing: {policy: cheapest, max_attempts: 2}
providers:
  - name: mesh-b
    kind: openai
    base_url: http://127.0.0.1:9/v1
    models:
      meshserve/tiny-llama-chat: tinylm
      acme/remote-chat: {upstream: Qwen/Qwen2.5-0.5B, tasks: [text-generation], context_length: 32768}
      sentence-transformers/all-MiniLM-L6-v2: null
  - name: local
    kind: local
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    return path


def test_missing_file_is_local_only(tmp_path):
    config = load_providers(tmp_path / "absent.yaml")
    assert config.providers == () and config.routing.policy == "fastest"


def test_model_values_string_mapping_and_null(tmp_path):
    config = load_providers(_write(tmp_path, GOOD))
    spec = config.providers[0]
    assert spec.upstream_name("meshserve/tiny-llama-chat") == "tinylm"
    assert spec.upstream_name("acme/remote-chat") == "Qwen/Qwen2.5-0.5B"
    assert spec.upstream_name("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert spec.models["acme/remote-chat"].tasks == ("text-generation",)
    assert config.routing.max_attempts == 2 and [p.name for p in config.remote] == ["mesh-b"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("providers: [{name: Mesh, kind: openai, base_url: http://x, models: {a: b}}]", "providers.0.name"),
        ("providers: [{name: fastest, kind: openai, base_url: http://x, models: {a: b}}]", "reserved"),
        ("providers: [{name: v1, kind: openai, base_url: http://x, models: {a: b}}]", "reserved"),
        ("providers: [{name: m, kind: openai, models: {a: b}}]", "base_url"),
        ("providers: [{name: m, kind: grpc, base_url: http://x, models: {a: b}}]", "providers.0.kind"),
        ("providers: [{name: m, kind: tgi, base_url: http://x, models: {a: b}, colour: red}]", "colour"),
        ("routing: {policy: random}", "routing.policy"),
        ("routing: {breaker: {failures: 0}}", "routing.breaker.failures"),
        ("providers: [{name: m, kind: tei, base_url: http://x, models: {a: {tasks: [poetry]}}}]", "tasks"),
        (
            "providers: [{name: m, kind: tei, base_url: http://x, models: {a: b}},"
            " {name: m, kind: tgi, base_url: http://y, models: {a: b}}]",
            "used twice",
        ),
        ("providers: [{name: local, kind: openai, base_url: http://x, models: {a: b}}]", "kind 'local'"),
    ],
)
def test_bad_file_names_file_and_field(tmp_path, body, field):
    path = _write(tmp_path, body)
    with pytest.raises(ValueError) as info:
        load_providers(path)
    message = str(info.value)
    assert str(path) in message and field in message and "\n" not in message


def test_remote_only_model_must_list_tasks(tmp_path):
    body = "providers: [{name: m, kind: openai, base_url: http://x, models: {acme/only-here: up}}]"
    path = _write(tmp_path, body)
    with pytest.raises(ValueError, match=r"providers\.0\.models\.acme/only-here\.tasks"):
        load_providers(path, catalog_ids={"meshserve/tiny-llama-chat"})
    body = "providers: [{name: m, kind: openai, base_url: http://x, models: {meshserve/tiny-llama-chat: up}}]"
    assert load_providers(_write(tmp_path, body), catalog_ids={"meshserve/tiny-llama-chat"}).providers


def test_local_needs_no_base_url_and_serves_catalog_models_only(tmp_path):
    assert load_providers(_write(tmp_path, "providers: [{name: local, kind: local}]")).providers[0].base_url is None
    path = _write(tmp_path, "providers: [{name: local, kind: local, models: {acme/x: null}}]")
    with pytest.raises(ValueError, match="catalog models only"):
        load_providers(path, catalog_ids={"meshserve/tiny-llama-chat"})


def test_local_prices_are_the_catalogs(tmp_path):
    """The local mesh bills the catalog entry's pricing on every path; the file cannot override it."""
    body = "providers: [{name: local, kind: local, pricing: {per_request_usd: 1.0}}]"
    with pytest.raises(ValueError, match="catalog entries' `pricing`"):
        load_providers(_write(tmp_path, body))


def test_invalid_yaml_is_one_line(tmp_path):
    path = _write(tmp_path, "providers: [unclosed\n  - x: {")
    with pytest.raises(ValueError) as info:
        load_providers(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)

"""A second meshserve as an `openai` provider: gateway B over the shared session mesh's stages is
provider `mesh-b` (priced at zero, so `:cheapest` picks it) of gateway C, whose other provider is
`local` (the same stages). Real clients, unmodified, pick providers with model suffixes and URLs
(openai SDK: chat, stream, embeddings; huggingface_hub: chat_completion and a task by URL); killing
B under unary load loses no request (C fails over to local) and leaves one ledger row per answer."""

from __future__ import annotations

import signal

import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from tests.helpers import MODEL_ID, GatewayProcess, mesh_home
from tests.providers.conftest import (
    LOCAL,
    PROVIDER_HEADER,
    Outcome,
    bounded_load,
    openai_provider,
    post_one,
    start_provider_gateway,
    write_providers,
)

pytestmark = [
    pytest.mark.xdist_group("mesh"),
    # The provider layer is the gateway's alone: the embedded mesh is enough behind it.
    pytest.mark.parametrize("mesh", ["embedded"], indirect=True),
]

LM = "meshserve/tiny-llama-chat"
HELLO = [{"role": "user", "content": "Tell me about json."}]
FREE = {"input_per_1k_tokens_usd": 0.0, "output_per_1k_tokens_usd": 0.0, "per_request_usd": 0.0}


def start_mesh_b(mesh, tmp) -> GatewayProcess:
    """Gateway B: a plain meshserve gateway over the mesh's stages (no providers, no ledger)."""
    env = {
        "MESHSERVE_HOME": str(mesh_home(tmp / "b-home")),
        "MESHSERVE_GATEWAY_PROVIDERS_FILE": str(tmp / "no-providers.yaml"),
        "MESHSERVE_GATEWAY_LEDGER": "false",
        "MESHSERVE_GATEWAY_AUTH": "false",
    }
    return GatewayProcess(mesh, tmp / "gateway-b.log", env)


def mesh_b_provider(b: GatewayProcess) -> dict:
    models = {LM: {"upstream": LM, "pricing": FREE}, MODEL_ID: {"upstream": MODEL_ID, "pricing": FREE}}
    return openai_provider("mesh-b", b.url + "/v1", models)


@pytest.fixture(scope="module")
def pair(mesh, tmp_path_factory):
    """(B, C): C's providers are `local` (first in file order) and `mesh-b`."""
    tmp = tmp_path_factory.mktemp("mesh-b")
    b = start_mesh_b(mesh, tmp)
    try:
        providers = [{"name": "local", "kind": "local"}, mesh_b_provider(b)]
        c = start_provider_gateway(tmp, write_providers(tmp / "providers.yaml", providers), mesh=mesh, name="gateway-c")
    except BaseException:
        b.stop()
        raise
    yield b, c
    c.stop()
    b.stop()


def rows_by_id(c, ids: set[str]) -> dict[str, dict]:
    return {r["request_id"]: r for r in c.ledger_rows() if r["request_id"] in ids}


def test_openai_sdk_chat_stream_and_embeddings_pick_providers(pair):
    _, c = pair
    client = OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=f"{LM}:mesh-b", messages=HELLO, max_tokens=8)
    assert raw.headers[PROVIDER_HEADER] == "mesh-b"
    assert raw.parse().choices[0].message.content and raw.parse().usage.completion_tokens > 0
    with client.chat.completions.with_streaming_response.create(
        model=f"{LM}:mesh-b", messages=HELLO, max_tokens=8, stream=True
    ) as streamed:
        assert streamed.headers[PROVIDER_HEADER] == "mesh-b"
        parts = [chunk.choices[0].delta.content or "" for chunk in streamed.parse() if chunk.choices]
    assert "".join(parts)
    cheapest = client.chat.completions.with_raw_response.create(model=f"{LM}:cheapest", messages=HELLO, max_tokens=4)
    assert cheapest.headers[PROVIDER_HEADER] == "mesh-b"  # free there, priced by the catalog locally
    ids = {raw.headers["x-request-id"], streamed.headers["x-request-id"], cheapest.headers["x-request-id"]}
    vectors = {}
    for suffix, provider in (("mesh-b", "mesh-b"), ("cheapest", "mesh-b"), ("local", "local")):
        reply = client.embeddings.with_raw_response.create(model=f"{MODEL_ID}:{suffix}", input=["a json document"])
        assert reply.headers.get(PROVIDER_HEADER, LOCAL) == provider, suffix
        vectors[suffix] = np.array(reply.parse().data[0].embedding)
        ids.add(reply.headers["x-request-id"])
    assert vectors["mesh-b"].shape == (384,)
    np.testing.assert_allclose(vectors["mesh-b"], vectors["local"], atol=1e-4)  # the same mesh behind both
    rows = rows_by_id(c, ids)
    assert len(rows) == len(ids)
    assert sorted(r["provider"] for r in rows.values()) == ["local"] + ["mesh-b"] * 5
    assert all(r["upstream_request_id"] for r in rows.values() if r["provider"] == "mesh-b")  # B's request ids


def test_huggingface_hub_client_with_policy_suffix_and_provider_urls(pair):
    _, c = pair
    routed = "task != 'text-generation' AND provider = 'mesh-b'"
    before = len(c.ledger_rows(routed))
    chat = InferenceClient(base_url=c.url)
    reply = chat.chat_completion(HELLO, model=f"{LM}:fastest", max_tokens=8)
    assert reply.choices[0].message.content
    for url in (f"{c.url}/models/{MODEL_ID}:mesh-b", f"{c.url}/mesh-b/models/{MODEL_ID}"):
        vector = np.asarray(InferenceClient(model=url).feature_extraction("a json document"))
        assert vector.shape[-1] == 384, (url, vector.shape)
    assert len(c.ledger_rows(routed)) == before + 2  # both task calls were answered by mesh-b


def test_killing_mesh_b_under_unary_load_fails_over_to_local(mesh, tmp_path):
    b = start_mesh_b(mesh, tmp_path)
    try:
        providers = [mesh_b_provider(b), {"name": "local", "kind": "local"}]  # mesh-b first: it takes the load
        c = start_provider_gateway(tmp_path, write_providers(tmp_path / "providers.yaml", providers), mesh=mesh,
                                   name="gateway-c")  # fmt: skip
    except BaseException:
        b.stop()
        raise
    try:
        outcomes = _load_and_kill(b, c)
        failed = [o for o in outcomes if not o.ok]
        assert not failed, failed[:3]
        assert b.process.poll() == -signal.SIGKILL
        assert {o.provider for o in outcomes} == {"mesh-b", "local"}
        rows = c.ledger_rows()
        assert sorted(r["request_id"] for r in rows) == sorted(o.request_id for o in outcomes)
        assert {r["status"] for r in rows} == {200}
    finally:
        c.stop()
        b.stop()


def _load_and_kill(b: GatewayProcess, c) -> list[Outcome]:
    """80 embeddings requests at c = 16 to C; B gets SIGKILL (by PID) at the 40th answer."""
    seen = [0]

    async def one(client: httpx.AsyncClient, i: int) -> Outcome:
        outcome = await post_one(client, c.url + "/v1/embeddings", {"model": MODEL_ID, "input": [f"kill {i}", "b"]})
        if outcome.ok:
            seen[0] += 1
            if seen[0] == 40:
                b.process.send_signal(signal.SIGKILL)
        return outcome

    return bounded_load(80, 16, one)

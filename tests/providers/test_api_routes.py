"""The API layer of providers through a real gateway process (main.py's wiring) with a providers.yaml
and fake upstreams (tests/fakes/upstream.py, real HTTP servers on loopback): model suffixes on the
OpenAI, HF and TGI routes, per-provider paths (and a 404 for an unknown provider, in the caller's
dialect), `/v1/models` with each model's providers in the HF router's shape, the gRPC `provider`
field, and route labels that never carry a provider's name. No local mesh: the `local` provider's
stages are closed ports, so a request routed locally answers 503, never 200."""

from __future__ import annotations

import grpc
import httpx
import pytest
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from services.gateway.api.request_context import route_label
from tests.helpers import MODEL_ID
from tests.providers.conftest import PROVIDER_HEADER, openai_provider, start_provider_gateway, write_providers

# One worker runs the whole module: its module-scoped fakes and gateway start once, not once per worker.
pytestmark = pytest.mark.xdist_group("providers-api")
CHAT = "acme/remote-chat"  # served only by mesh-b (an OpenAI-kind fake)
EMBED = "acme/remote-embed"  # served by mesh-b and tei-b
HF_MODEL = "acme/remote-sentiment"  # served only by hf-b (an HF-kind fake)
RANKER = "acme/remote-ranker"  # served only by tei-b
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, fakes):
    """One gateway for the module: mesh-b (openai), tei-b (tei) and hf-b (hf), each a fake."""
    tmp = tmp_path_factory.mktemp("api")
    mesh_b, tei_b = fakes["start"]("mesh-b"), fakes["start"]("tei-b")
    hf_b = fakes["start"]("hf-b", hf_tasks={"up-sentiment": "text-classification"})
    providers = [
        openai_provider(
            "mesh-b",
            mesh_b.url + "/v1",
            {
                CHAT: {"upstream": "up-chat", "tasks": ["text-generation"], "context_length": 4096},
                EMBED: {"upstream": "up-embed", "tasks": ["feature-extraction"]},
                MODEL_ID: "up-minilm",
            },
            pricing={"input_per_1k_tokens_usd": 0.001, "output_per_1k_tokens_usd": 0.002},
        ),
        {
            "name": "tei-b",
            "kind": "tei",
            "base_url": tei_b.url,
            "models": {
                EMBED: {"upstream": "up-embed", "tasks": ["feature-extraction"]},
                RANKER: {"upstream": "up-ranker", "tasks": ["text-ranking"]},
            },
        },
        {
            "name": "hf-b",
            "kind": "hf",
            "base_url": hf_b.url,
            "models": {HF_MODEL: {"upstream": "up-sentiment", "tasks": ["text-classification"]}},
        },
    ]
    gw = start_provider_gateway(tmp, write_providers(tmp / "providers.yaml", providers))
    yield gw, {"mesh-b": mesh_b, "tei-b": tei_b, "hf-b": hf_b}
    gw.stop()


@pytest.fixture
def client(gateway):
    with httpx.Client(base_url=gateway[0].url, timeout=60) as c:
        yield c


def chat(client: httpx.Client, path: str = "/v1/chat/completions", **body) -> httpx.Response:
    return client.post(path, json={"messages": MESSAGES, "max_tokens": 3, **body})


# ---------------------------------------------------------------- suffixes


def test_a_provider_suffix_routes_there_and_answers_the_bare_model_id(client, gateway):
    reply = chat(client, model=f"{CHAT}:mesh-b")
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == CHAT
    assert reply.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    assert reply.headers[PROVIDER_HEADER] == "mesh-b"
    assert int(reply.headers["x-meshserve-attempts"]) == 1
    upstream = gateway[1]["mesh-b"].requests()[-1]
    assert upstream["path"] == "/v1/chat/completions" and upstream["body"]["model"] == "up-chat"


@pytest.mark.parametrize("suffix", ["", ":fastest", ":cheapest", ":preferred", ":auto"])
def test_a_policy_suffix_or_none_picks_a_provider(client, suffix):
    reply = chat(client, model=CHAT + suffix)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == CHAT
    assert reply.headers[PROVIDER_HEADER] == "mesh-b"


def test_an_unknown_suffix_is_a_400_naming_providers_and_policies_in_openai_dialect(client):
    reply = chat(client, model=f"{CHAT}:nowhere")
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "model" and error["code"] == "invalid_input"
    for name in ("'nowhere'", "local", "mesh-b", "tei-b", "hf-b", "fastest", "cheapest", "preferred"):
        assert name in error["message"]


def test_an_unknown_suffix_is_a_400_in_the_hf_dialect_on_model_urls(client):
    for path in (f"/models/{CHAT}:nowhere", f"/models/{EMBED}:nowhere/pipeline/feature-extraction"):
        reply = client.post(path, json={"inputs": "hello"})
        assert reply.status_code == 400, reply.text
        body = reply.json()
        assert "'nowhere'" in body["error"] and "mesh-b" in body["error"] and body["error_type"]


def test_a_provider_that_does_not_serve_the_model_is_a_400_naming_its_providers(client):
    reply = chat(client, model=f"{CHAT}:tei-b")
    assert reply.status_code == 400, reply.text
    assert "mesh-b" in reply.json()["error"]["message"]


def test_a_local_suffix_takes_the_local_path(client):
    # The local mesh is not running here: the local path answers 503 for its stages.
    reply = client.post("/v1/embeddings", json={"model": f"{MODEL_ID}:local", "input": "hello"})
    assert reply.status_code == 503, reply.text
    assert PROVIDER_HEADER not in reply.headers


def test_embeddings_with_a_provider_suffix_render_as_the_local_path_does(client):
    for model, provider in (
        (f"{EMBED}:mesh-b", "mesh-b"),
        (f"{EMBED}:tei-b", "tei-b"),
        (f"{MODEL_ID}:mesh-b", "mesh-b"),
    ):
        reply = client.post("/v1/embeddings", json={"model": model, "input": ["hello there", "bye"]})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "list" and body["model"] == model.rsplit(":", 1)[0]
        assert [d["index"] for d in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 8
        assert reply.headers[PROVIDER_HEADER] == provider
        assert "x-usage-input-tokens" in reply.headers


def test_completions_and_tgi_bodies_route_by_suffix(client):
    reply = client.post("/v1/completions", json={"model": f"{CHAT}:mesh-b", "prompt": "say", "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == "tok0 tok1" and reply.json()["model"] == CHAT
    reply = client.post(f"/models/{CHAT}:mesh-b", json={"inputs": "say", "parameters": {"max_new_tokens": 2}})
    assert reply.status_code == 200, reply.text
    assert reply.json() == [{"generated_text": "tok0 tok1"}]
    assert reply.headers[PROVIDER_HEADER] == "mesh-b"


def test_a_stream_with_a_suffix_is_served_over_sse_with_the_provider_header(client):
    body = {"model": f"{CHAT}:mesh-b", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers[PROVIDER_HEADER] == "mesh-b"
        text = "".join(reply.iter_text())
    assert text.rstrip().endswith("data: [DONE]")
    assert "tok2" in text and CHAT in text


def test_an_hf_task_routes_to_an_hf_provider_and_passes_its_json_through(client, gateway):
    reply = client.post(f"/models/{HF_MODEL}", json={"inputs": "good great"})
    assert reply.status_code == 200, reply.text
    assert reply.json()[0][0]["label"] == "POSITIVE"
    assert reply.headers[PROVIDER_HEADER] == "hf-b"
    assert gateway[1]["hf-b"].requests()[-1]["path"].endswith("up-sentiment")


def test_rerank_routes_by_model_suffix_in_both_dialects(client):
    texts = ["a good answer", "unrelated words", "good"]
    reply = client.post(
        "/rerank", json={"model": f"{RANKER}:tei-b", "query": "good", "texts": texts, "return_text": True}
    )
    assert reply.status_code == 200, reply.text
    ranked = reply.json()
    assert sorted(r["index"] for r in ranked) == [0, 1, 2] and {r["text"] for r in ranked} == set(texts)
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert reply.headers[PROVIDER_HEADER] == "tei-b"
    reply = client.post("/v1/rerank", json={"model": RANKER, "query": "good", "documents": texts, "top_n": 2})
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == RANKER and len(reply.json()["results"]) == 2
    reply = client.post("/v1/rerank", json={"model": f"{RANKER}:nowhere", "query": "good", "documents": texts})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "model"


def test_a_catalog_model_url_fails_over_from_the_local_mesh_to_a_remote_provider(client):
    # Policy `preferred`: local first; its stages are closed ports, so mesh-b answers the embedding.
    reply = client.post(f"/models/{MODEL_ID}", json={"inputs": ["hello there", "bye"]})
    assert reply.status_code == 200, reply.text
    assert reply.headers[PROVIDER_HEADER] == "mesh-b" and reply.headers["x-meshserve-attempts"] == "2"
    assert len(reply.json()) == 2 and len(reply.json()[0]) == 8


def test_a_body_shaped_for_a_local_only_task_takes_the_local_path(client):
    # zero-shot-classification (from the body's shape) is served by the local mesh alone: its
    # path answers (503: no mesh here), never a remote embedding provider.
    body = {"inputs": "hello", "parameters": {"candidate_labels": ["a", "b"]}}
    reply = client.post(f"/models/{MODEL_ID}", json=body)
    assert reply.status_code == 503, reply.text
    assert PROVIDER_HEADER not in reply.headers


# ---------------------------------------------------------------- per-provider paths


def test_per_provider_paths_route_to_that_provider(client):
    reply = chat(client, "/mesh-b/v1/chat/completions", model=CHAT)
    assert reply.status_code == 200, reply.text
    assert reply.headers[PROVIDER_HEADER] == "mesh-b" and reply.json()["model"] == CHAT
    reply = client.post("/tei-b/v1/embeddings", json={"model": EMBED, "input": "hello"})
    assert reply.status_code == 200, reply.text
    assert reply.headers[PROVIDER_HEADER] == "tei-b"
    reply = client.post("/mesh-b/v1/completions", json={"model": CHAT, "prompt": "say", "max_tokens": 1})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "tok0"
    reply = client.post(f"/mesh-b/models/{CHAT}", json={"inputs": "say", "parameters": {"max_new_tokens": 1}})
    assert reply.status_code == 200 and reply.json() == [{"generated_text": "tok0"}]
    body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 1}  # huggingface_hub sends the model too
    reply = client.post(f"/mesh-b/models/{CHAT}/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "tok0"
    reply = client.post(f"/hf-b/models/{HF_MODEL}/pipeline/text-classification", json={"inputs": "good"})
    assert reply.status_code == 200 and reply.headers[PROVIDER_HEADER] == "hf-b"


def test_a_per_provider_path_for_a_model_it_does_not_serve_is_refused(client):
    reply = client.post("/tei-b/v1/chat/completions", json={"model": CHAT, "messages": MESSAGES})
    assert reply.status_code == 400, reply.text
    assert "mesh-b" in reply.json()["error"]["message"]


def test_an_unknown_provider_path_is_a_404_in_the_callers_dialect_naming_the_providers(client):
    reply = chat(client, "/nowhere/v1/chat/completions", model=CHAT)
    assert reply.status_code == 404
    error = reply.json()["error"]  # OpenAI's dialect under /{provider}/v1
    assert error["code"] == "not_found" and "'nowhere'" in error["message"] and "mesh-b" in error["message"]
    reply = client.post(f"/nowhere/models/{CHAT}", json={"inputs": "say"})
    assert reply.status_code == 404
    body = reply.json()  # the HF API's dialect under /{provider}/models
    assert isinstance(body["error"], str) and "local" in body["error"] and body["error_type"]


def test_existing_paths_win_over_per_provider_paths(client):
    reply = client.get("/v1/models")
    assert reply.status_code == 200 and reply.json()["object"] == "list"
    reply = client.post("/admin/v1/embeddings", json={"model": EMBED, "input": "x"})
    assert reply.status_code == 404  # not a provider: `admin` is reserved


# ---------------------------------------------------------------- /v1/models


ROUTER_KEYS = {"provider", "status", "context_length", "pricing", "supports_tools", "supports_structured_output"}
OUR_KEYS = {"latency_s", "ttft_s", "throughput", "error_rate", "is_default", "kind"}


def test_models_list_every_model_with_its_providers_in_the_router_shape(client):
    chat(client, model=CHAT)  # one sample of mesh-b for the chat model
    reply = client.get("/v1/models")
    assert reply.status_code == 200
    data = {m["id"]: m for m in reply.json()["data"]}
    assert {MODEL_ID, "meshserve/tiny-llama-chat", CHAT, EMBED, HF_MODEL, RANKER} <= set(data)
    for model in data.values():
        assert {"id", "object", "created", "owned_by", "tasks", "providers"} <= set(model)
        assert sum(p["is_default"] for p in model["providers"]) == 1
        for p in model["providers"]:
            assert ROUTER_KEYS | OUR_KEYS <= set(p)
            assert set(p["pricing"]) >= {"input", "output"}
    assert [p["provider"] for p in data[MODEL_ID]["providers"]] == ["local", "mesh-b"]
    assert [p["provider"] for p in data[EMBED]["providers"]] == ["mesh-b", "tei-b"]
    (mesh_b,) = data[CHAT]["providers"]
    assert mesh_b["status"] == "live" and mesh_b["context_length"] == 4096
    assert mesh_b["pricing"] == {"input": pytest.approx(1.0), "output": pytest.approx(2.0)}  # USD per 1M tokens
    # Tools and JSON schemas: decoded by our own mesh for its generation models, refused for remote ones.
    assert not mesh_b["supports_tools"] and not mesh_b["supports_structured_output"]
    (local_lm,) = [p for p in data["meshserve/tiny-llama-chat"]["providers"] if p["provider"] == "local"]
    assert local_lm["supports_tools"] and local_lm["supports_structured_output"]
    assert not any(p["supports_tools"] for p in data[MODEL_ID]["providers"])  # an embedding model
    assert mesh_b["latency_s"] is not None and mesh_b["latency_s"] > 0
    assert data[CHAT]["tasks"] == ["text-generation"]


def test_one_model_lists_its_providers_remote_only_or_from_the_catalog(client):
    reply = client.get(f"/v1/models/{CHAT}")
    assert reply.status_code == 200, reply.text
    assert [p["provider"] for p in reply.json()["providers"]] == ["mesh-b"]
    reply = client.get(f"/v1/models/{MODEL_ID}")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["meshserve"]["default_task"] == "feature-extraction" and len(body["providers"]) == 2
    assert client.get("/v1/models/acme/nothing").status_code == 404


# ---------------------------------------------------------------- gRPC


async def test_grpc_generate_and_predict_take_a_provider(gateway):
    async with grpc.aio.insecure_channel(gateway[0].grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        params = tasks_pb2.GenerationParameters(max_new_tokens=2)
        for request in (
            gateway_pb2.GenerateRequest(model_id=CHAT, prompt="say", parameters=params, provider="mesh-b"),
            gateway_pb2.GenerateRequest(model_id=f"{CHAT}:mesh-b", prompt="say", parameters=params),
            gateway_pb2.GenerateRequest(model_id=CHAT, prompt="say", parameters=params, provider="cheapest"),
        ):
            steps = [step async for step in stub.Generate(request)]
            assert "".join(s.text for s in steps) == "tok0 tok1"
            assert steps[-1].finish_reason == "length" and steps[-1].usage.output_tokens == 2
        texts = tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=["hello", "there"]))
        call = stub.Predict(gateway_pb2.PredictRequest(model_id=EMBED, inputs=texts, provider="tei-b"))
        reply = await call
        assert list(reply.result.embeddings.shape) == [2, 8] and reply.model_id == EMBED
        assert dict(await call.trailing_metadata())[PROVIDER_HEADER] == "tei-b"
        ranking = tasks_pb2.TextRankingInputs(query="good", documents=["unrelated", "good", "good good"])
        ranked = await stub.Predict(
            gateway_pb2.PredictRequest(model_id=f"{RANKER}:tei-b", inputs=tasks_pb2.TaskInputs(text_ranking=ranking))
        )
        scores = list(ranked.result.similarities.scores)  # document order, as the local mesh answers
        assert len(scores) == 3 and scores[0] < scores[1] <= scores[2]


@pytest.mark.parametrize("provider", ["nowhere", "tei-b"])
async def test_grpc_refuses_a_provider_that_cannot_serve_with_invalid_argument(gateway, provider):
    async with grpc.aio.insecure_channel(gateway[0].grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        request = gateway_pb2.GenerateRequest(model_id=CHAT, prompt="say", provider=provider)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.Generate(request):
                pass
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "mesh-b" in raised.value.details()


# ---------------------------------------------------------------- route labels


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/mesh-b/v1/chat/completions", "/{provider}/v1/chat/completions"),
        ("/any-name.2/v1/completions", "/{provider}/v1/completions"),
        ("/mesh-b/v1/embeddings", "/{provider}/v1/embeddings"),
        ("/hf-b/models/acme/x/pipeline/text-classification", "/{provider}/models"),
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/models/acme/x:mesh-b", "/models"),
        ("/mesh-b/other", "other"),
    ],
)
def test_per_provider_paths_are_labelled_without_the_provider_name(path, label):
    assert route_label(path) == label

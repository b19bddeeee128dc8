"""token-classification of users' folders through a running mesh (embedded and Triton): the HF
client's token_classification, raw HF bodies and gRPC Predict, against transformers' own pipeline
on the same folder for every aggregation strategy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from tests.usermodels.conftest import served
from tests.usermodels.folders_ner import FOLDERS

pytestmark = pytest.mark.xdist_group("usermodels")

TASK = "token-classification"
MODELS = sorted(FOLDERS)
STRATEGIES = ("none", "simple", "first", "average", "max")
SENTENCES = [
    "My name is Wolfgang and I live in Berlin.",
    "Café  naïve  Zoë met   Jean-Baptiste at Montréal's OpenAI HQ!!",
    "Unbelievably, the antidisestablishmentarianism debate in São Paulo (Brazil) continued.",
    "  Hugging Face Inc. is a company based in New York City.  ",
    "I ❤ 🤗 emojis ✓ and naïveté…",
]


@pytest.fixture(scope="module")
def pipelines(user_folders):
    from transformers import pipeline

    cache: dict = {}

    def get(model_id: str, strategy: str):
        if (model_id, strategy) not in cache:
            cache[model_id, strategy] = pipeline(TASK, model=str(user_folders[model_id]), aggregation_strategy=strategy)
        return cache[model_id, strategy]

    return get


def plain(entities) -> list[dict]:
    """Entities (the client's dataclasses, JSON dicts or the pipeline's dicts) as comparable dicts."""
    out = []
    for e in entities:
        e = {k: v for k, v in (e if isinstance(e, dict) else vars(e)).items() if v is not None}
        out.append(
            {k: (float(v) if k == "score" else int(v) if k in ("start", "end", "index") else v) for k, v in e.items()}
        )
    return out


def assert_same(ours, theirs) -> None:
    ours, theirs = plain(ours), plain(theirs)
    assert [{k: v for k, v in e.items() if k != "score"} for e in ours] == [
        {k: v for k, v in e.items() if k != "score"} for e in theirs
    ]
    np.testing.assert_allclose([e["score"] for e in ours], [e["score"] for e in theirs], atol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model_id", MODELS)
def test_inference_client_equals_the_pipeline(user_mesh, hf_client, pipelines, model_id, strategy):
    client = hf_client(model_id)
    for text in SENTENCES:
        assert_same(
            client.token_classification(text, aggregation_strategy=strategy), pipelines(model_id, strategy)(text)
        )


@pytest.mark.parametrize("model_id", MODELS)
def test_the_default_strategy_is_simple_and_ignores_o(user_mesh, hf_client, pipelines, model_id):
    ours = hf_client(model_id).token_classification(SENTENCES[1])
    assert_same(ours, pipelines(model_id, "simple")(SENTENCES[1]))
    assert all(e.entity_group and e.entity_group != "O" for e in ours)


@pytest.mark.parametrize("model_id", MODELS)
def test_ignore_labels_as_the_pipeline(user_mesh, hf_client, pipelines, model_id):
    client = hf_client(model_id)
    for ignore in (["O", "PER", "B-LOC"], []):
        ours = client.token_classification(SENTENCES[2], aggregation_strategy="average", ignore_labels=ignore)
        assert_same(ours, pipelines(model_id, "average")(SENTENCES[2], ignore_labels=ignore))


@pytest.mark.parametrize("model_id", MODELS)
def test_a_list_of_texts_gets_a_list_per_text_across_batch_chunks(user_mesh, pipelines, model_id):
    """More texts than one model batch (32): the request runs in chunks whose rows share one length."""
    texts = [SENTENCES[i % len(SENTENCES)][: 10 + 3 * i] for i in range(40)]
    body = {"inputs": texts, "parameters": {"aggregation_strategy": "first"}}
    reply = httpx.post(served(user_mesh, model_id), json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    want = pipelines(model_id, "first")(texts)
    assert len(reply.json()) == len(texts)
    for ours, theirs in zip(reply.json(), want, strict=True):
        assert_same(ours, theirs)


@pytest.mark.parametrize("model_id", MODELS)
def test_concurrent_requests_of_different_lengths_each_get_their_own_tokens(user_mesh, pipelines, model_id):
    texts = [SENTENCES[i % len(SENTENCES)] * (1 + i % 3) for i in range(24)]
    url = served(user_mesh, model_id)

    def call(text: str):
        return httpx.post(url, json={"inputs": text, "parameters": {"aggregation_strategy": "none"}}, timeout=120)

    with ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(pool.map(call, texts))
    for text, reply in zip(texts, replies, strict=True):
        assert reply.status_code == 200, reply.text
        assert_same(reply.json(), pipelines(model_id, "none")(text))


def test_stride_is_refused_naming_the_parameter(user_mesh):
    body = {"inputs": SENTENCES[0], "parameters": {"stride": 16, "aggregation_strategy": "simple"}}
    reply = httpx.post(served(user_mesh, MODELS[0]), json=body, timeout=60)
    assert reply.status_code == 400
    assert "parameters.stride" in reply.text


def test_unknown_strategy_is_refused(user_mesh):
    body = {"inputs": SENTENCES[0], "parameters": {"aggregation_strategy": "longest"}}
    reply = httpx.post(served(user_mesh, MODELS[0]), json=body, timeout=60)
    assert reply.status_code == 400
    assert "aggregation_strategy" in reply.text


@pytest.mark.parametrize("model_id", MODELS)
def test_grpc_predict_equals_the_pipeline(user_mesh, pipelines, model_id):
    served(user_mesh, model_id)
    request = gateway_pb2.PredictRequest(
        model_id=model_id,
        task=tasks_pb2.TASK_TOKEN_CLASSIFICATION,
        inputs=tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=SENTENCES[:3])),
        parameters=tasks_pb2.TaskParameters(aggregation_strategy=tasks_pb2.AGGREGATION_STRATEGY_MAX),
    )
    with grpc.insecure_channel(user_mesh.grpc_target) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Predict(request, timeout=120)
    assert reply.task == tasks_pb2.TASK_TOKEN_CLASSIFICATION
    want = pipelines(model_id, "max")(SENTENCES[:3])
    for item, theirs in zip(reply.result.entities.items, want, strict=True):
        ours = [{"entity_group": e.entity, "score": e.score, "word": e.word, "start": e.start, "end": e.end}
                for e in item.entities]  # fmt: skip
        assert_same(ours, theirs)

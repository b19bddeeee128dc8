"""Users' sequence classifiers and cross-encoders, served from their folders, against the libraries'
own answers on the same folder: transformers' pipeline("text-classification") (labels, order,
scores 1e-4; single texts and {text, text_pair}) and sentence-transformers' CrossEncoder.predict
(TEI's /rerank, the Cohere/Jina /v1/rerank, the HF route's text-ranking, the typed gRPC Predict)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from tests.usermodels.conftest import served

pytestmark = pytest.mark.xdist_group("usermodels")

SST3, MULTI, RERANKER = "test/bert-sst3", "test/roberta-multilabel", "test/bert-reranker"
CLASSIFIERS = (SST3, MULTI, RERANKER)
TEXTS = ["I loved this film, the cast was wonderful.", "The service was slow and the food cold."]
PAIRS = [
    {"text": "A man is playing a guitar.", "text_pair": "Someone plays music."},
    {"text": "The cat sleeps on the sofa.", "text_pair": "A dog runs in the park."},
]
QUERY = "how do plants make food"
DOCUMENTS = [
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "The stock market fell sharply on Monday.",
    "Plants make their food in the leaves.",
    "A recipe for tomato soup.",
]
# Over the folders' 128-token limit with its query: truncated (longest_first) or refused.
LONG = " ".join(["leaves and roots and stems"] * 60)
ATOL = 1e-4


@pytest.fixture(scope="module")
def pipelines(user_folders):
    from transformers import pipeline

    return {m: pipeline("text-classification", model=str(user_folders[m]), device="cpu") for m in CLASSIFIERS}


@pytest.fixture(scope="module")
def cross_encoder(user_folders):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(user_folders[RERANKER]), device="cpu")


def _same_labels(got: list[dict], want: list[dict]) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=ATOL)


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, json=body, timeout=120)


@pytest.mark.parametrize("model_id", CLASSIFIERS)
@pytest.mark.parametrize(
    "params",
    [{}, {"top_k": 2}, {"function_to_apply": "softmax"}, {"function_to_apply": "none", "top_k": 1}],
    ids=["default", "top2", "softmax", "none-top1"],
)
def test_hf_client_text_classification_matches_pipeline(user_mesh, hf_client, pipelines, model_id, params):
    client = hf_client(model_id)
    for text in TEXTS:
        got = client.text_classification(text, **params)
        want = pipelines[model_id](text, top_k=params.get("top_k"), function_to_apply=params.get("function_to_apply"))
        _same_labels([{"label": g.label, "score": g.score} for g in got], want)


@pytest.mark.parametrize("model_id", CLASSIFIERS)
def test_text_pairs_match_pipeline(user_mesh, pipelines, model_id):
    url = served(user_mesh, model_id) + "/pipeline/text-classification"
    many = _post(url, {"inputs": PAIRS})
    assert many.status_code == 200, many.text
    for pair, got in zip(PAIRS, many.json(), strict=True):
        _same_labels(got, pipelines[model_id](pair, top_k=None))
    one = _post(url, {"inputs": PAIRS[0], "parameters": {"top_k": 1}})
    assert one.status_code == 200, one.text
    _same_labels(one.json()[0], pipelines[model_id](PAIRS[0], top_k=1))


def test_long_pair_is_truncated_longest_first(user_mesh, pipelines):
    pair = {"text": "Where are the roots?", "text_pair": LONG}
    got = _post(served(user_mesh, SST3), {"inputs": pair})
    assert got.status_code == 200, got.text
    _same_labels(got.json()[0], pipelines[SST3](pair, top_k=None, truncation=True))
    refused = _post(served(user_mesh, SST3), {"inputs": pair, "parameters": {"truncate": False}})
    assert refused.status_code == 400, refused.text


def test_bare_url_picks_the_task_from_the_body(user_mesh, pipelines, cross_encoder):
    url = served(user_mesh, RERANKER)  # tasks [text-ranking, text-classification]
    ranked = _post(url, {"inputs": {"query": QUERY, "documents": DOCUMENTS}})
    assert ranked.status_code == 200, ranked.text
    scores = cross_encoder.predict([(QUERY, d) for d in DOCUMENTS])
    assert [r["index"] for r in ranked.json()] == sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])
    assert [r["score"] for r in ranked.json()] == pytest.approx(sorted(scores, reverse=True), abs=ATOL)
    classified = _post(url, {"inputs": PAIRS[0]})
    assert classified.status_code == 200, classified.text
    _same_labels(classified.json()[0], pipelines[RERANKER](PAIRS[0], top_k=None))


@pytest.mark.parametrize("raw", [False, True])
def test_tei_rerank_matches_cross_encoder(user_mesh, cross_encoder, raw):
    import torch

    body = {"query": QUERY, "texts": [*DOCUMENTS, LONG], "raw_scores": raw, "return_text": True, "truncate": True}
    got = _post(user_mesh.url + "/rerank", body)
    assert got.status_code == 200, got.text
    kwargs = {"activation_fn": torch.nn.Identity()} if raw else {}
    want = cross_encoder.predict([(QUERY, d) for d in body["texts"]], **kwargs)
    order = sorted(range(len(want)), key=lambda i: -want[i])
    assert [r["index"] for r in got.json()] == order
    assert [r["score"] for r in got.json()] == pytest.approx([float(want[i]) for i in order], abs=ATOL)
    assert [r["text"] for r in got.json()] == [body["texts"][i] for i in order]


def test_tei_rerank_refuses_as_tei(user_mesh):
    too_long = _post(user_mesh.url + "/rerank", {"query": QUERY, "texts": [LONG]})  # TEI: truncate off
    assert too_long.status_code == 400 and "error" in too_long.json()
    not_ranker = _post(user_mesh.url + "/rerank", {"query": QUERY, "texts": ["x"], "model": SST3})
    assert not_ranker.status_code == 400, not_ranker.text
    left = _post(user_mesh.url + "/rerank", {"query": QUERY, "texts": ["x"], "truncation_direction": "Left"})
    assert left.status_code == 400 and left.json()["error_type"] == "validation"


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
def test_cohere_rerank_matches_cross_encoder(user_mesh, user_folders, cross_encoder, route):
    from transformers import AutoTokenizer

    documents = [DOCUMENTS[0], {"text": DOCUMENTS[1]}, *DOCUMENTS[2:], LONG]
    texts = [*DOCUMENTS, LONG]
    with httpx.Client(base_url=user_mesh.url, timeout=120) as client:
        got = client.post(route, json={"model": RERANKER, "query": QUERY, "documents": documents, "top_n": 3})
    assert got.status_code == 200, got.text
    body = got.json()
    want = cross_encoder.predict([(QUERY, d) for d in texts])
    order = sorted(range(len(want)), key=lambda i: -want[i])[:3]
    assert body["model"] == RERANKER and body["id"]
    assert [r["index"] for r in body["results"]] == order
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([float(want[i]) for i in order], abs=ATOL)
    assert [r["document"]["text"] for r in body["results"]] == [texts[i] for i in order]
    tokenizer = AutoTokenizer.from_pretrained(str(user_folders[RERANKER]))
    tokens = sum(len(tokenizer(QUERY, t, truncation=True, max_length=128).input_ids) for t in texts)
    assert body["usage"]["total_tokens"] == tokens


def test_cohere_rerank_errors_in_openai_dialect(user_mesh):
    for route in ("/v1/rerank", "/v2/rerank"):
        wrong = _post(user_mesh.url + route, {"model": SST3, "query": QUERY, "documents": ["x"]})
        assert wrong.status_code == 400, wrong.text
        assert {"message", "type", "code", "param"} <= set(wrong.json()["error"])
        empty = _post(user_mesh.url + route, {"model": RERANKER, "query": QUERY, "documents": []})
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "documents"
    no_docs = _post(user_mesh.url + "/v1/rerank", {"query": QUERY, "documents": ["x"], "return_documents": False})
    assert no_docs.status_code == 200 and "document" not in no_docs.json()["results"][0]  # the only ranker


def test_grpc_predict_ranking_and_pairs(user_mesh, pipelines, cross_encoder):
    with grpc.insecure_channel(user_mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        ranking = tasks_pb2.TaskInputs(text_ranking=tasks_pb2.TextRankingInputs(query=QUERY, documents=DOCUMENTS))
        ranked = stub.Predict(
            gateway_pb2.PredictRequest(model_id=RERANKER, task=tasks_pb2.TASK_TEXT_RANKING, inputs=ranking),
            timeout=120,
        )
        pairs = tasks_pb2.TaskInputs(
            text_pairs=tasks_pb2.TextPairInputs(pairs=[tasks_pb2.TextPair(**p) for p in PAIRS])
        )
        classified = stub.Predict(
            gateway_pb2.PredictRequest(model_id=MULTI, task=tasks_pb2.TASK_TEXT_CLASSIFICATION, inputs=pairs),
            timeout=120,
        )
    want = cross_encoder.predict([(QUERY, d) for d in DOCUMENTS])
    assert list(ranked.result.similarities.scores) == pytest.approx([float(s) for s in want], abs=ATOL)
    assert ranked.usage.items == len(DOCUMENTS)
    for pair, item in zip(PAIRS, classified.result.classifications.items, strict=True):
        _same_labels([{"label": c.label, "score": c.score} for c in item.labels], pipelines[MULTI](pair, top_k=None))

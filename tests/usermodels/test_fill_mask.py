"""Users' *ForMaskedLM folders fill masks as transformers' FillMaskPipeline does (tokens, token_str,
sequence, order, scores 1e-4, top_k, targets; a list per mask when a text has several), through
huggingface_hub's InferenceClient, the raw HF route and gRPC Predict, on both inference backends."""

from __future__ import annotations

import grpc
import httpx
import pytest
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from tests.usermodels.conftest import served

pytestmark = pytest.mark.xdist_group("usermodels")

BERT, ROBERTA = "test/bert-mlm", "test/roberta-mlm"
TEXTS = {
    BERT: ["Paris is the [MASK] of France.", "The [MASK] sat on the [MASK] all day."],
    ROBERTA: ["The movie was <mask>.", "I <mask> this film, it was <mask> and long."],
}
ATOL = 1e-4


@pytest.fixture(scope="module")
def pipelines(user_folders):
    from transformers import pipeline

    return {m: pipeline("fill-mask", model=str(user_folders[m]), device="cpu") for m in TEXTS}


def same_fills(got, want) -> None:
    """Same nesting, tokens, texts and sequences; scores within 1e-4."""
    got, want = (got, want) if want and isinstance(want[0], list) else ([got], [want])
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [(f["token"], f["token_str"], f["sequence"]) for f in g] == [
            (f["token"], f["token_str"], f["sequence"]) for f in w
        ]
        assert [f["score"] for f in g] == pytest.approx([f["score"] for f in w], abs=ATOL)


@pytest.mark.parametrize("model_id", sorted(TEXTS))
@pytest.mark.parametrize("params", [{}, {"top_k": 3}, {"top_k": 10}], ids=["default", "top3", "top10"])
def test_hf_client_fill_mask_matches_pipeline(user_mesh, hf_client, pipelines, model_id, params):
    text = TEXTS[model_id][0]
    got = hf_client(model_id).fill_mask(text, **params)
    same_fills([dict(vars(e)) for e in got], pipelines[model_id](text, **params))


def test_hf_client_targets_match_pipeline(user_mesh, hf_client, pipelines):
    text = TEXTS[BERT][0]
    for targets in (["capital", "city", "river"], ["city", "zzqx"]):
        got = hf_client(BERT).fill_mask(text, targets=targets, top_k=2)
        same_fills([dict(vars(e)) for e in got], pipelines[BERT](text, targets=targets, top_k=2))


@pytest.mark.parametrize("model_id", sorted(TEXTS))
def test_several_masks_and_texts_nest_as_the_pipeline(user_mesh, pipelines, model_id):
    url = served(user_mesh, model_id)
    several = TEXTS[model_id][1]
    got = httpx.post(url, json={"inputs": several, "parameters": {"top_k": 2}}, timeout=120)
    assert got.status_code == 200, got.text
    same_fills(got.json(), pipelines[model_id](several, top_k=2))
    both = httpx.post(url, json={"inputs": TEXTS[model_id]}, timeout=120).json()
    for answer, text in zip(both, TEXTS[model_id], strict=True):
        same_fills(answer, pipelines[model_id](text))


def test_text_without_the_mask_token_is_refused(user_mesh):
    got = httpx.post(served(user_mesh, ROBERTA), json={"inputs": "No mask in this one."}, timeout=120)
    assert got.status_code == 400
    assert "<mask>" in got.json()["error"]
    unknown = httpx.post(
        served(user_mesh, BERT), json={"inputs": TEXTS[BERT][0], "parameters": {"topk": 2}}, timeout=120
    )
    assert unknown.status_code == 400 and "topk" in unknown.json()["error"]


def test_grpc_predict_fill_mask(user_mesh, pipelines):
    inputs = tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=TEXTS[BERT]))
    with grpc.insecure_channel(user_mesh.grpc_target) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Predict(
            gateway_pb2.PredictRequest(
                model_id=BERT, task=tasks_pb2.TASK_FILL_MASK, inputs=inputs,
                parameters=tasks_pb2.TaskParameters(top_k=3),
            ),
            timeout=120,
        )  # fmt: skip
    assert reply.usage.items == 2
    for item, text in zip(reply.result.fill_mask.items, TEXTS[BERT], strict=True):
        masks = [
            [{"score": f.score, "token": f.token, "token_str": f.token_str, "sequence": f.sequence} for f in m.fills]
            for m in item.masks
        ]
        same_fills(masks[0] if len(masks) == 1 else masks, pipelines[BERT](text, top_k=3))

"""`runtime_engine: onnx` through the full mesh, on both inference backends: embeddings equal
sentence-transformers' within 1e-5 cosine, classifier scores equal the torch runtime's."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from services.inference.runtime import load_runtime
from tests.helpers import MODEL_ID, TRITON_SKIP_REASON, TRITON_SUPPORTED, serving_only, start_mesh

# Its two meshes (embedded, Triton) are module-scoped: one worker starts them, not both.
pytestmark = pytest.mark.xdist_group("onnx")
SENTIMENT = "meshserve/sentiment-minilm"
TEXTS = ["A short one.", "The quick brown fox jumps over the lazy dog, twice and then again.", "great", "awful film"]


@pytest.fixture(
    scope="module",
    params=[
        "embedded",
        pytest.param("triton", marks=pytest.mark.skipif(not TRITON_SUPPORTED, reason=TRITON_SKIP_REASON)),
    ],
)
def onnx_mesh(request, models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"onnx-{request.param}")
    env = serving_only(folder, MODEL_ID, SENTIMENT, runtime_engine="onnx", instances=1)
    running = start_mesh(folder, env, backend=request.param)
    yield running
    running.stop()


def test_onnx_embeddings_equal_sentence_transformers_within_1e5_cosine(onnx_mesh, reference_encoder):
    reply = httpx.post(f"{onnx_mesh.url}/v1/embeddings", json={"model": MODEL_ID, "input": TEXTS}, timeout=60)
    assert reply.status_code == 200, reply.text
    got = np.array([item["embedding"] for item in reply.json()["data"]], dtype=np.float32)
    expected = reference_encoder.encode(TEXTS, normalize_embeddings=True)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 1 - 1e-5


def test_onnx_classifier_scores_equal_the_torch_runtime(onnx_mesh, catalog, models_dir):
    from transformers import AutoTokenizer

    entry = catalog.get(SENTIMENT)
    folder = entry.store_dir(models_dir) / "model"
    reply = httpx.post(f"{onnx_mesh.url}/models/{SENTIMENT}", json={"inputs": TEXTS}, timeout=60)
    assert reply.status_code == 200, reply.text
    tokens = AutoTokenizer.from_pretrained(str(folder))(TEXTS, padding=True, return_tensors="np")
    inputs = {name: tokens[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    logits = load_runtime(entry.inference.runtime, folder).execute(inputs)["logits"]
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = list(entry.postprocess.labels)
    for row, scores in zip(expected, reply.json(), strict=True):
        got = {item["label"]: item["score"] for item in scores}
        assert [got[label] for label in labels] == pytest.approx(row.tolist(), abs=1e-5)

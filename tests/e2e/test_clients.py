"""The real openai and huggingface_hub clients against a running mesh."""

from __future__ import annotations

import numpy as np
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaped over a sleepy hound.",
    "Interest rates rose sharply in the third quarter.",
    "Ünïcödé text, emoji 🚀 and CJK 漢字 survive the trip.",
]


def assert_close(ours, reference) -> None:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    assert ours.shape == ref.shape
    cosine = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert np.max(1 - cosine) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_openai_embeddings_default_base64_match_sentence_transformers(mesh, reference_encoder):
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused")
    reply = client.embeddings.create(model=MODEL_ID, input=SENTENCES)
    assert [d.index for d in reply.data] == list(range(len(SENTENCES)))
    ours = [d.embedding for d in reply.data]
    assert_close(ours, reference_encoder.encode(SENTENCES, normalize_embeddings=True))
    assert reply.model == MODEL_ID
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > len(SENTENCES) * 3


def test_openai_embeddings_float_format_and_single_string(mesh, reference_encoder):
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused")
    reply = client.embeddings.create(model=MODEL_ID, input=SENTENCES[0], encoding_format="float")
    assert len(reply.data) == 1 and len(reply.data[0].embedding) == 384
    assert_close(reply.data[0].embedding, reference_encoder.encode(SENTENCES[0], normalize_embeddings=True))


def test_openai_models_list_and_retrieve_with_slash_in_id(mesh):
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused")
    assert MODEL_ID in [m.id for m in client.models.list().data]
    model = client.models.retrieve(MODEL_ID)  # sent as .../models/sentence-transformers%2Fall-MiniLM-L6-v2
    assert model.id == MODEL_ID and model.owned_by == "sentence-transformers"


def test_hf_feature_extraction_matches_sentence_transformers(mesh, reference_encoder):
    client = InferenceClient(model=f"{mesh.url}/models/{MODEL_ID}")
    single = client.feature_extraction(SENTENCES[0])
    assert single.shape == (384,)
    assert_close(single, reference_encoder.encode(SENTENCES[0], normalize_embeddings=True))
    batch = client.feature_extraction(SENTENCES)
    assert batch.shape == (len(SENTENCES), 384)
    assert_close(batch, reference_encoder.encode(SENTENCES, normalize_embeddings=True))


def test_hf_sentence_similarity_matches_sentence_transformers(mesh, reference_encoder):
    client = InferenceClient(model=f"{mesh.url}/models/{MODEL_ID}/pipeline/sentence-similarity")
    scores = client.sentence_similarity(SENTENCES[0], other_sentences=SENTENCES[1:])
    ref = reference_encoder.encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(scores, ref[1:] @ ref[0], atol=1e-5)
    assert scores[0] > scores[1]  # the paraphrase is closer than the finance sentence


# sentence_similarity on the bare model URL: tests/e2e/test_hf_contract_gaps.py


def test_more_texts_than_one_batch_are_chunked_and_kept_in_order(mesh, reference_encoder):
    texts = [f"sentence number {i} about topic {i % 7}" for i in range(75)]  # > max_batch_size 32
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused")
    reply = client.embeddings.create(model=MODEL_ID, input=texts, encoding_format="float")
    assert_close([d.embedding for d in reply.data], reference_encoder.encode(texts, normalize_embeddings=True))

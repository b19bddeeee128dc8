"""Users' sentence-transformers folders served by a mesh, through the real openai SDK and
huggingface_hub's InferenceClient, against SentenceTransformer(folder).encode: pooling modes,
Dense, prompts (prompt_name), Matryoshka `dimensions`, sentence-similarity; and requests that
differ only in prompt or dimensions never share a coalesced call or a cached response."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pytest

from tests.usermodels.conftest import served
from tests.usermodels.factory import built, corpus
from tests.usermodels.folders_embedders import FOLDERS

pytestmark = pytest.mark.xdist_group("usermodels")

TEXTS = [*corpus()[:4], "Short.", "A much longer sentence about the weather, the sea and the mountains in June."]
EMBEDDERS = sorted(FOLDERS)


@cache
def st_model(model_id: str, truncate_dim: int | None = None):
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformer(str(built(model_id, FOLDERS[model_id])), device="cpu", truncate_dim=truncate_dim)


@cache
def st_unnormalized(model_id: str):
    """The folder's SentenceTransformer without its Normalize module (what normalize=false returns)."""
    from sentence_transformers import SentenceTransformer

    model = st_model(model_id)
    return SentenceTransformer(modules=[m for m in model if type(m).__name__ != "Normalize"], device="cpu")


def reference(model_id: str, texts, *, truncate_dim: int | None = None, **kw) -> np.ndarray:
    return st_model(model_id, truncate_dim).encode(texts, convert_to_numpy=True, **kw)


def assert_same(ours, theirs) -> None:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert cos.min() >= 1 - 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1), rtol=1e-4)


def openai_vectors(client, model_id: str, texts, **kw) -> np.ndarray:
    reply = client.embeddings.create(model=model_id, input=texts, **kw)
    return np.array([d.embedding for d in sorted(reply.data, key=lambda d: d.index)])


@pytest.mark.parametrize("model_id", EMBEDDERS)
def test_openai_embeddings_equal_sentence_transformers(user_mesh, openai_client, model_id):
    served(user_mesh, model_id)
    assert_same(openai_vectors(openai_client, model_id, TEXTS), reference(model_id, TEXTS))
    floats = openai_vectors(openai_client, model_id, TEXTS[0], encoding_format="float")
    assert_same(floats, reference(model_id, TEXTS[:1]))


@pytest.mark.parametrize("model_id", ["test/bert-mean", "test/roberta-max-dense"])
def test_openai_dimensions_equal_truncate_dim(user_mesh, openai_client, model_id):
    served(user_mesh, model_id)
    ours = openai_vectors(openai_client, model_id, TEXTS, dimensions=8)
    assert ours.shape == (len(TEXTS), 8)
    assert_same(ours, reference(model_id, TEXTS, truncate_dim=8, normalize_embeddings=True))


def test_openai_prompt_name_in_extra_body(user_mesh, openai_client):
    served(user_mesh, "test/bert-mean")
    for name in ("query", "document"):
        ours = openai_vectors(openai_client, "test/bert-mean", TEXTS, extra_body={"prompt_name": name})
        assert_same(ours, reference("test/bert-mean", TEXTS, prompt_name=name))


def test_openai_refusals_name_what_is_allowed(user_mesh, openai_client):
    import openai

    served(user_mesh, "test/roberta-max-dense")
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.embeddings.create(model="test/roberta-max-dense", input="x", dimensions=17)
    assert "16" in str(err.value) and "dimensions" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.embeddings.create(model="test/bert-mean", input="x", extra_body={"prompt_name": "search"})
    assert "'query'" in str(err.value) and "'document'" in str(err.value)


@pytest.mark.parametrize("model_id", EMBEDDERS)
def test_hf_feature_extraction_equals_sentence_transformers(hf_client, model_id):
    client = hf_client(model_id)
    assert_same(client.feature_extraction(TEXTS), reference(model_id, TEXTS))
    raw = client.feature_extraction(TEXTS, normalize=False)
    assert_same(raw, st_unnormalized(model_id).encode(TEXTS, convert_to_numpy=True))


def test_hf_feature_extraction_prompt_name_and_dimensions(hf_client):
    client = hf_client("test/bert-mean")
    ours = client.feature_extraction(TEXTS, prompt_name="query")
    assert_same(ours, reference("test/bert-mean", TEXTS, prompt_name="query"))
    short = client.feature_extraction(TEXTS, prompt_name="document", dimensions=4)
    theirs = reference("test/bert-mean", TEXTS, prompt_name="document", truncate_dim=4, normalize_embeddings=True)
    assert_same(short, theirs)


@pytest.mark.parametrize("model_id", EMBEDDERS)
def test_hf_sentence_similarity_equals_sentence_transformers(hf_client, model_id):
    scores = hf_client(model_id, "sentence-similarity").sentence_similarity(TEXTS[0], TEXTS[1:])
    vectors = reference(model_id, TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(scores, vectors[1:] @ vectors[0], atol=1e-4)


def test_prompts_and_dimensions_never_share_a_call_or_a_cache_entry(user_mesh, openai_client):
    """Concurrent requests for the same texts with different prompts and sizes (the coalescer
    merges concurrent requests of one key), then each again (the response cache answers repeats):
    every answer is its own request's."""
    served(user_mesh, "test/bert-mean")
    variants = [{}, {"extra_body": {"prompt_name": "query"}}, {"extra_body": {"prompt_name": "document"}}]
    variants += [{"dimensions": 8}, {"dimensions": 8, "extra_body": {"prompt_name": "query"}}]
    text = [TEXTS[1]]

    def expected(kw: dict) -> np.ndarray:
        prompt = kw.get("extra_body", {}).get("prompt_name")
        dims = kw.get("dimensions")
        return reference("test/bert-mean", text, prompt_name=prompt, truncate_dim=dims, normalize_embeddings=True)

    for _ in range(2):
        jobs = variants * 4
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda kw: openai_vectors(openai_client, "test/bert-mean", text, **kw), jobs))
        for kw, answer in zip(jobs, answers, strict=True):
            assert_same(answer, expected(kw))

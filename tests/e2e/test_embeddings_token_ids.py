"""Token-id input of OpenAI's embeddings API through a real mesh: on /v1 the ids are the model's
own tokenizer's (vLLM's reading); on /tiktoken/v1 they are tiktoken's cl100k_base ids (OpenAI's
reading), which is what LangChain's OpenAIEmbeddings sends with its defaults. LlamaIndex's
OpenAIEmbedding sends text. Real clients, unmodified."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from openai import BadRequestError, OpenAI

from tests.e2e.test_clients import SENTENCES, assert_close
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")


def bundled_tiktoken_cache() -> str:
    """The cl100k_base file llama-index-core ships (tiktoken's cache layout): what lets tiktoken,
    on the client as on the gateway, work without downloading anything."""
    spec = importlib.util.find_spec("llama_index.core")
    assert spec is not None and spec.submodule_search_locations, "llama-index-core is a pinned test dependency"
    return str(Path(next(iter(spec.submodule_search_locations))) / "_static" / "tiktoken_cache")


@pytest.fixture
def own_ids(reference_encoder):
    """Each sentence as the model's own tokenizer encodes it ([CLS] ... [SEP])."""
    tokenizer = reference_encoder.tokenizer
    return [tokenizer(s)["input_ids"] for s in SENTENCES]


def test_own_token_ids_embed_as_their_text(mesh, reference_encoder, own_ids):
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused")
    reply = client.embeddings.create(model=MODEL_ID, input=own_ids, user="user-1")
    assert_close([d.embedding for d in reply.data], reference_encoder.encode(SENTENCES, normalize_embeddings=True))
    assert reply.usage.prompt_tokens == sum(len(ids) for ids in own_ids)
    single = client.embeddings.create(model=MODEL_ID, input=own_ids[0], encoding_format="float")
    assert_close(single.data[0].embedding, reference_encoder.encode(SENTENCES[0], normalize_embeddings=True))


def test_own_token_ids_with_dimensions_are_cut_and_renormalized(mesh, own_ids):
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused")
    full = np.asarray(client.embeddings.create(model=MODEL_ID, input=own_ids[:1]).data[0].embedding)
    cut = np.asarray(client.embeddings.create(model=MODEL_ID, input=own_ids[:1], dimensions=64).data[0].embedding)
    assert cut.shape == (64,)
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)


@pytest.mark.parametrize(
    "bad, words",
    [
        ([[101, 30522, 102]], "outside this model's vocabulary"),
        ([[101] + [1000] * 300 + [102]], "limit is 256"),
        ([[]], "no token ids"),
        ([[-1, 5]], "between 0 and"),
        ([[2**64]], "between 0 and"),
    ],
)
def test_bad_token_ids_are_a_400_naming_input(mesh, bad, words):
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError) as caught:
        client.embeddings.create(model=MODEL_ID, input=bad)
    error = caught.value.body
    assert error["param"] == "input" and words in error["message"], error


def test_langchain_openai_embeddings_with_defaults(mesh, reference_encoder, monkeypatch):
    """LangChain's defaults: tiktoken (cl100k_base for a model name tiktoken does not know) on the
    client, the ids posted in chunks. Offline, tiktoken finds its file in llama-index-core's copy."""
    from langchain_openai import OpenAIEmbeddings

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", bundled_tiktoken_cache())
    embeddings = OpenAIEmbeddings(model=MODEL_ID, base_url=mesh.url + "/tiktoken/v1", api_key="unused")
    documents = embeddings.embed_documents(SENTENCES)
    assert_close(documents, reference_encoder.encode(SENTENCES, normalize_embeddings=True))
    query = embeddings.embed_query(SENTENCES[2])
    assert_close(query, reference_encoder.encode(SENTENCES[2], normalize_embeddings=True))


def test_langchain_long_text_is_cut_to_the_model_limit_on_the_tiktoken_route(mesh, reference_encoder, monkeypatch):
    """LangChain splits at 8191 cl100k tokens, far over MiniLM's 256: the tiktoken route cuts as
    sentence-transformers does rather than refusing every long document."""
    from langchain_openai import OpenAIEmbeddings

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", bundled_tiktoken_cache())
    text = " ".join(SENTENCES * 40)
    embeddings = OpenAIEmbeddings(model=MODEL_ID, base_url=mesh.url + "/tiktoken/v1", api_key="unused")
    assert_close(embeddings.embed_query(text), reference_encoder.encode(text, normalize_embeddings=True))


def test_cl100k_ids_outside_the_encoding_are_a_400(mesh):
    client = OpenAI(base_url=mesh.url + "/tiktoken/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError) as caught:
        client.embeddings.create(model=MODEL_ID, input=[[9906, 100256]])
    assert caught.value.body["param"] == "input" and "cl100k_base" in caught.value.body["message"]


def test_text_input_works_the_same_on_the_tiktoken_route(mesh, reference_encoder):
    client = OpenAI(base_url=mesh.url + "/tiktoken/v1", api_key="unused")
    reply = client.embeddings.create(model=MODEL_ID, input=SENTENCES)
    assert_close([d.embedding for d in reply.data], reference_encoder.encode(SENTENCES, normalize_embeddings=True))


def test_llama_index_openai_embedding_with_defaults(mesh, reference_encoder):
    from llama_index.embeddings.openai import OpenAIEmbedding

    embedding = OpenAIEmbedding(model_name=MODEL_ID, api_base=mesh.url + "/v1", api_key="unused")
    vectors = embedding.get_text_embedding_batch(SENTENCES)
    assert_close(vectors, reference_encoder.encode(SENTENCES, normalize_embeddings=True))
    query = embedding.get_query_embedding(SENTENCES[1])
    assert_close(query, reference_encoder.encode(SENTENCES[1], normalize_embeddings=True))

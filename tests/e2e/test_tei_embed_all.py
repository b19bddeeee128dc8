"""TEI's /embed_all through a real mesh on both inference backends (the `mesh` fixture): each
input's token embeddings, one [tokens][hidden] array per input with padding removed, served by the
model's `token_embeddings` inference output; bodies validated against TEI's OpenAPI schemas, and
the output asked for by name by a real KServe v2 client (tritonclient)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from transformers import AutoTokenizer

from tests.e2e.test_clients import SENTENCES
from tests.e2e.test_tokenize_tei_tgi import check
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")

HIDDEN = 384


@pytest.fixture(scope="module")
def tokenizer(models_dir):
    return AutoTokenizer.from_pretrained(str(models_dir / MODEL_ID / "model"))


def post(mesh, path: str, body) -> httpx.Response:
    return httpx.post(mesh.url + path, json=body, timeout=60)


def test_embed_all_gives_each_input_its_own_tokens(mesh, tokenizer):
    texts = [SENTENCES[0], "Short.", SENTENCES[1]]  # mixed lengths: the batch pads the short one
    for path in ("/embed_all", f"/tei/{MODEL_ID}/embed_all"):
        reply = post(mesh, path, {"inputs": texts})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        check("tei", "EmbedAllResponse", body)
        assert [len(rows) for rows in body] == [len(tokenizer(t)["input_ids"]) for t in texts]
        assert all(len(row) == HIDDEN for rows in body for row in rows)
    single = post(mesh, "/embed_all", {"inputs": SENTENCES[0]}).json()
    np.testing.assert_allclose(np.asarray(single[0]), np.asarray(body[0]), atol=1e-5)


def test_mean_of_token_embeddings_is_the_pooled_embedding(mesh):
    """all-MiniLM-L6-v2 pools by mean: /embed's un-normalized vector is the mean of its tokens."""
    tokens = post(mesh, "/embed_all", {"inputs": SENTENCES[:3]}).json()
    pooled = np.asarray(post(mesh, "/embed", {"inputs": SENTENCES[:3], "normalize": False}).json())
    means = np.stack([np.asarray(rows).mean(axis=0) for rows in tokens])
    np.testing.assert_allclose(means, pooled, atol=1e-5)


def test_embed_all_takes_token_ids_truncate_and_prompt_rules(mesh, tokenizer):
    ids = tokenizer(SENTENCES[0])["input_ids"]
    by_ids = post(mesh, "/embed_all", {"inputs": ids}).json()
    by_text = post(mesh, "/embed_all", {"inputs": SENTENCES[0]}).json()
    np.testing.assert_allclose(np.asarray(by_ids), np.asarray(by_text), atol=1e-5)
    long = "word " * 400
    refused = post(mesh, "/embed_all", {"inputs": long})
    assert refused.status_code == post(mesh, "/embed", {"inputs": long}).status_code == 400, refused.text
    assert "truncate" in refused.json()["error"]
    check("tei", "ErrorResponse", refused.json())
    cut = post(mesh, "/embed_all", {"inputs": long, "truncate": True})
    assert cut.status_code == 200 and len(cut.json()[0]) == 256  # the catalog's max_length


@pytest.mark.parametrize(
    "body, status",
    [
        ({"inputs": "a", "normalize": True}, 400),  # not a field of TEI's EmbedAllRequest
        ({"inputs": "a", "dimensions": 8}, 400),
        ({"inputs": "a", "truncation_direction": "Left"}, 400),
        ({"inputs": []}, 400),
        ({"inputs": [10**9]}, 400),
        ({"inputs": "a", "prompt_name": "nope"}, 400),
    ],
)
def test_bad_embed_all_requests_are_tei_errors(mesh, body, status):
    reply = post(mesh, "/embed_all", body)
    assert reply.status_code == status, reply.text
    check("tei", "ErrorResponse", reply.json())


def test_a_model_without_token_embeddings_is_a_424(mesh):
    reply = post(mesh, "/tei/meshserve/sentiment-minilm/embed_all", {"inputs": "a"})
    assert reply.status_code in (400, 424), reply.text  # 400 when the model does not serve feature-extraction
    check("tei", "ErrorResponse", reply.json())


def test_kserve_clients_ask_for_token_embeddings_by_name(mesh, tokenizer):
    """The inference service's contract lists the output; a client gets only what it names."""
    client = triton_grpc.InferenceServerClient(mesh.inference_target)
    metadata = dict(mesh.service_metadata)
    name = "all-MiniLM-L6-v2"
    outputs = {o.name: list(o.shape) for o in client.get_model_metadata(name, headers=metadata).outputs}
    assert outputs["token_embeddings"] == [-1, -1, HIDDEN] and outputs["embedding"] == [-1, HIDDEN]
    encoded = tokenizer(SENTENCES[:2], padding=True, return_tensors="np")
    inputs = []
    for key in ("input_ids", "attention_mask"):
        tensor = triton_grpc.InferInput(key, list(encoded[key].shape), "INT64")
        tensor.set_data_from_numpy(encoded[key].astype(np.int64))
        inputs.append(tensor)
    asked = [triton_grpc.InferRequestedOutput("token_embeddings")]
    result = client.infer(name, inputs, outputs=asked, headers=metadata)
    assert [o.name for o in result.get_response().outputs] == ["token_embeddings"]
    hidden = result.as_numpy("token_embeddings")
    assert hidden.shape == (2, encoded["input_ids"].shape[1], HIDDEN)
    pooled = client.infer(name, inputs, outputs=[triton_grpc.InferRequestedOutput("embedding")], headers=metadata)
    mask = encoded["attention_mask"][..., None]
    means = (hidden * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(means, pooled.as_numpy("embedding"), atol=1e-5)
    client.close()

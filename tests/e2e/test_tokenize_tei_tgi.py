"""vLLM's /tokenize and /detokenize, TEI's /embed, /embed_all and /info, and TGI's /generate,
/generate_stream and /info through a real mesh. TEI and TGI bodies and stream events are
validated against the schemas of their published OpenAPI documents (vendored in
tests/contract/openapi/tgi_tei_schemas.json); huggingface_hub's InferenceClient is the real client."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from openapi_schema_validator import OAS30Validator
from transformers import AutoTokenizer

from tests.e2e.test_clients import SENTENCES, assert_close
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")

LM = "meshserve/tiny-llama-chat"


def nullable_refs(node):
    """The documents' utoipa form of a nullable reference, `{"allOf": [ref], "nullable": true}`,
    read as its authors mean it (TGI itself sends `null` there): the reference, or null. Strict
    OpenAPI 3.0 would let `nullable` apply only beside `allOf` and refuse the null."""
    if isinstance(node, list):
        return [nullable_refs(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: nullable_refs(v) for k, v in node.items()}
    if node.get("nullable") and "allOf" in node:
        rest = {k: v for k, v in node.items() if k not in ("allOf", "nullable", "default", "example")}
        return {**rest, "anyOf": [*node["allOf"], {"enum": [None]}]}
    return node


SCHEMAS = nullable_refs(
    json.loads((Path(__file__).parents[1] / "contract" / "openapi" / "tgi_tei_schemas.json").read_text())
)
# TEI's document names its ErrorType values as the Rust enum does (`Validation`) while its own
# examples and server send them lowercase (`{"error": "Batch is empty", "error_type": "empty"}`).
_TEI_ERROR_TYPE = SCHEMAS["tei"]["schemas"]["ErrorType"]
_TEI_ERROR_TYPE["enum"] = [v.lower() for v in _TEI_ERROR_TYPE["enum"]]


def check(api: str, name: str, value) -> None:
    """`value` is valid against schema `name` of TGI's or TEI's OpenAPI document (OpenAPI 3.0:
    nullable fields, `$ref`s into the document's components)."""
    document = {"components": {"schemas": SCHEMAS[api]["schemas"]}}
    schema = {**SCHEMAS[api]["schemas"][name], "components": document["components"]}
    OAS30Validator(schema).validate(value)


@pytest.fixture(scope="module")
def lm_tokenizer(models_dir):
    return AutoTokenizer.from_pretrained(str(models_dir / LM / "model"))


def post(mesh, path: str, body) -> httpx.Response:
    return httpx.post(mesh.url + path, json=body, timeout=60)


# -- vLLM /tokenize and /detokenize -----------------------------------------------------------


def test_tokenize_a_prompt_as_the_models_tokenizer_does(mesh, lm_tokenizer, reference_encoder):
    reply = post(mesh, "/tokenize", {"model": LM, "prompt": "Hello there, world"}).json()
    assert reply["tokens"] == lm_tokenizer.encode("Hello there, world")
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 512
    assert reply["token_strs"] is None
    encoder = post(mesh, "/tokenize", {"model": MODEL_ID, "prompt": SENTENCES[0], "return_token_strs": True}).json()
    assert encoder["tokens"] == reference_encoder.tokenizer(SENTENCES[0])["input_ids"]
    assert encoder["max_model_len"] == 256 and encoder["token_strs"][0] == "[CLS]"
    bare = post(mesh, "/tokenize", {"model": MODEL_ID, "prompt": SENTENCES[0], "add_special_tokens": False}).json()
    assert bare["tokens"] == encoder["tokens"][1:-1]


def test_tokenize_a_chat_with_the_models_template(mesh, lm_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    reply = post(mesh, "/tokenize", {"model": LM, "messages": messages}).json()
    rendered = lm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert reply["tokens"] == lm_tokenizer.encode(rendered, add_special_tokens=False)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}]
    closed = post(mesh, "/tokenize", {"model": LM, "messages": parts, "add_generation_prompt": False}).json()
    plain = lm_tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False)
    assert closed["tokens"] == lm_tokenizer.encode(plain, add_special_tokens=False)


def test_detokenize_round_trips(mesh, lm_tokenizer):
    ids = post(mesh, "/tokenize", {"model": LM, "prompt": "round trip", "add_special_tokens": False}).json()["tokens"]
    assert post(mesh, "/detokenize", {"model": LM, "tokens": ids}).json() == {"prompt": "round trip"}
    ids = post(mesh, "/tokenize", {"model": MODEL_ID, "prompt": "round trip"}).json()["tokens"]
    assert post(mesh, "/detokenize", {"model": MODEL_ID, "tokens": ids}).json() == {"prompt": "[CLS] round trip [SEP]"}


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/tokenize", {"model": LM}, 400),
        ("/tokenize", {"model": LM, "prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400),
        ("/tokenize", {"model": LM, "prompt": "a", "tools": []}, 400),
        ("/tokenize", {"model": MODEL_ID, "messages": [{"role": "user", "content": "a"}]}, 400),
        ("/tokenize", {"model": "meshserve/digits-cnn", "prompt": "a"}, 400),
        ("/tokenize", {"model": "no/such-model", "prompt": "a"}, 404),
        (
            "/tokenize",
            {"model": LM, "messages": [{"role": "user", "content": "a"}], "continue_final_message": True},
            400,
        ),
        ("/detokenize", {"model": LM, "tokens": [10**9]}, 400),
        ("/detokenize", {"model": LM, "tokens": [-1]}, 400),
    ],
)
def test_bad_tokenize_requests_are_client_errors(mesh, path, body, status):
    reply = post(mesh, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]  # vLLM answers in OpenAI's error shape
    assert error["message"] and error["type"]


# -- TEI ---------------------------------------------------------------------------------------


def test_tei_embed_matches_sentence_transformers_and_tei_schema(mesh, reference_encoder):
    reference = reference_encoder.encode(SENTENCES, normalize_embeddings=True)
    for path in ("/embed", f"/tei/{MODEL_ID}/embed"):
        body = {"inputs": SENTENCES, "truncate": False}
        check("tei", "EmbedRequest", body)
        reply = post(mesh, path, body)
        assert reply.status_code == 200, reply.text
        check("tei", "EmbedResponse", reply.json())
        assert_close(reply.json(), reference)
    single = post(mesh, "/embed", {"inputs": SENTENCES[0]}).json()
    assert np.asarray(single).shape == (1, 384)
    raw = np.asarray(post(mesh, "/embed", {"inputs": SENTENCES[:2], "normalize": False}).json())
    assert not np.allclose(np.linalg.norm(raw, axis=-1), 1.0)
    assert_close(raw / np.linalg.norm(raw, axis=-1, keepdims=True), reference[:2])  # the same direction


def test_tei_embed_takes_the_models_own_token_ids(mesh, reference_encoder):
    ids = [reference_encoder.tokenizer(s)["input_ids"] for s in SENTENCES[:2]]
    reply = post(mesh, "/embed", {"inputs": ids})
    assert reply.status_code == 200, reply.text
    assert_close(reply.json(), reference_encoder.encode(SENTENCES[:2], normalize_embeddings=True))


def test_huggingface_hub_feature_extraction_on_the_tei_base_url(mesh, reference_encoder):
    client = InferenceClient(model=f"{mesh.url}/tei/{MODEL_ID}")
    batch = client.feature_extraction(SENTENCES)
    assert_close(batch, reference_encoder.encode(SENTENCES, normalize_embeddings=True))


def test_tei_info_has_every_required_field(mesh):
    for path in ("/info", f"/tei/{MODEL_ID}/info"):
        info = httpx.get(mesh.url + path).json()
        check("tei", "Info", info)
        assert info["model_id"] == MODEL_ID and info["max_input_length"] == 256
        assert info["model_type"] == {"embedding": {"pooling": "mean"}}


def test_tei_errors_are_in_tei_shape(mesh):
    for path, body, status in [
        ("/embed", {"inputs": []}, 400),
        ("/embed", {"inputs": "a", "truncation_direction": "Left"}, 400),
        ("/embed", {"inputs": "a", "bogus": 1}, 400),
        ("/embed_all", {"inputs": "a", "normalize": True}, 400),  # served: tests/e2e/test_tei_embed_all.py
        (f"/tei/{MODEL_ID}/embed_all", {"inputs": []}, 400),
        (f"/tei/{LM}/embed", {"inputs": "a"}, 400),
    ]:
        reply = post(mesh, path, body)
        assert reply.status_code == status, (path, reply.text)
        check("tei", "ErrorResponse", reply.json())


# -- TGI ---------------------------------------------------------------------------------------


# TGI's routes on a model's TGI base URL and on its HF model URL alike.
TGI_BASES = (f"/tgi/{LM}", f"/models/{LM}")


@pytest.mark.parametrize("base", TGI_BASES)
def test_tgi_generate_is_one_generate_response(mesh, base):
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8, "details": True, "seed": 3}}
    check("tgi", "GenerateRequest", body)
    reply = post(mesh, f"{base}/generate", body)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    check("tgi", "GenerateResponse", result)
    assert result["details"]["generated_tokens"] == len(result["details"]["tokens"]) <= 8


@pytest.mark.parametrize("base", TGI_BASES)
def test_tgi_generate_stream_events_are_stream_responses(mesh, base):
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6}}
    events = []
    with httpx.stream("POST", f"{mesh.url}{base}/generate_stream", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    for event in events:
        check("tgi", "StreamResponse", event)
    assert events[-1]["details"]["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert all(e["generated_text"] is None for e in events[:-1])


@pytest.mark.parametrize("base", TGI_BASES)
def test_tgi_info_has_every_required_field(mesh, base):
    info = httpx.get(f"{mesh.url}{base}/info").json()
    check("tgi", "Info", info)
    assert info["model_id"] == LM and info["max_input_tokens"] == 448 and info["max_total_tokens"] == 512


def test_huggingface_hub_text_generation_on_the_tgi_base_url(mesh):
    client = InferenceClient(model=f"{mesh.url}/tgi/{LM}")
    out = client.text_generation("Once upon a time", max_new_tokens=6, details=True, seed=1)
    assert out.details.generated_tokens <= 6 and isinstance(out.generated_text, str)
    streamed = list(client.text_generation("Once upon a time", max_new_tokens=6, stream=True, details=True))
    assert streamed[-1].details is not None and streamed[-1].generated_text is not None


def test_tgi_errors_are_in_tgi_shape(mesh):
    for path, body, status in [
        (f"/tgi/{LM}/generate", {"inputs": "a", "stream": True}, 400),
        (f"/tgi/{LM}/generate", {"inputs": ""}, 400),
        (f"/tgi/{LM}/generate_stream", {"inputs": "a", "parameters": {"best_of": 2}}, 400),
        (f"/tgi/{MODEL_ID}/generate", {"inputs": "a"}, 400),
    ]:
        reply = post(mesh, path, body)
        assert reply.status_code == status, (path, reply.text)
        check("tgi", "ErrorResponse", reply.json())

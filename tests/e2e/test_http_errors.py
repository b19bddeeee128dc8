"""Bad input through the real gateway: the right status, a JSON body in the caller's dialect,
never a 500, never a stack trace, and the mesh keeps serving afterwards."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")

HF = f"/models/{MODEL_ID}"
SIM = f"/models/{MODEL_ID}/pipeline/sentence-similarity"
EMB = "/v1/embeddings"
LONG_TEXT = "word " * 600  # ~600 tokens, over the 256-token limit


def emb(**body) -> bytes:
    return orjson.dumps({"model": MODEL_ID, **body})


CASES = [
    # (id, method, path, body, status, code/error_type)
    ("openai-malformed-json", "POST", EMB, b'{"model": ', 400, "invalid_input"),
    ("openai-body-not-object", "POST", EMB, b"[1, 2]", 400, "invalid_input"),
    ("openai-missing-input", "POST", EMB, orjson.dumps({"model": MODEL_ID}), 400, "invalid_input"),
    ("openai-input-wrong-type", "POST", EMB, emb(input=5), 400, "invalid_input"),
    ("openai-empty-list", "POST", EMB, emb(input=[]), 400, "invalid_input"),
    ("openai-empty-string", "POST", EMB, emb(input=""), 400, "invalid_input"),
    ("openai-token-ids-outside-vocab", "POST", EMB, emb(input=[[1, 2, 10**6]]), 400, "invalid_input"),
    ("openai-bad-encoding", "POST", EMB, emb(input="x", encoding_format="int8"), 400, "invalid_input"),
    ("openai-unknown-field", "POST", EMB, emb(input="x", temperature=1), 400, "invalid_input"),
    ("openai-wrong-dimensions", "POST", EMB, emb(input="x", dimensions=385), 400, "invalid_input"),
    ("openai-over-token-limit", "POST", EMB, emb(input=LONG_TEXT), 400, "invalid_input"),
    ("openai-too-many-items", "POST", EMB, emb(input=["a"] * 2049), 413, "payload_too_large"),
    ("openai-body-too-large", "POST", EMB, emb(input="a" * (9 * 1024 * 1024)), 413, "payload_too_large"),
    ("openai-unknown-model", "POST", EMB, orjson.dumps({"model": "acme/nope", "input": "x"}), 404, "model_not_found"),
    ("openai-unknown-model-get", "GET", "/v1/models/acme/nope", None, 404, "model_not_found"),
    ("openai-unknown-route", "GET", "/v1/nothing-here", None, 404, "not_found"),
    ("openai-wrong-method", "PUT", EMB, b"{}", 405, "invalid_input"),
    ("hf-malformed-json", "POST", HF, b"{inputs: 1}", 400, "validation"),
    ("hf-empty-body", "POST", HF, b"", 400, "validation"),
    ("hf-missing-inputs", "POST", HF, b'{"parameters": {}}', 400, "validation"),
    ("hf-inputs-wrong-type", "POST", HF, b'{"inputs": 42}', 400, "validation"),
    ("hf-inputs-list-of-numbers", "POST", HF, b'{"inputs": [1, 2]}', 400, "validation"),
    ("hf-empty-text", "POST", HF, b'{"inputs": "  "}', 400, "validation"),
    ("hf-unknown-parameter", "POST", HF, b'{"inputs": "x", "parameters": {"top_k": 3}}', 400, "validation"),
    ("hf-parameters-not-object", "POST", HF, b'{"inputs": "x", "parameters": [1]}', 400, "validation"),
    (
        "hf-no-truncation-over-limit",
        "POST",
        HF,
        orjson.dumps({"inputs": LONG_TEXT, "truncate": False}),
        400,
        "validation",
    ),
    ("hf-unknown-model", "POST", "/models/acme/nope", b'{"inputs": "x"}', 404, "not_found"),
    ("hf-unsupported-task", "POST", f"{HF}/pipeline/text-classification", b'{"inputs": "x"}', 400, "validation"),
    ("hf-unknown-task", "POST", f"{HF}/pipeline/not-a-task", b'{"inputs": "x"}', 400, "validation"),
    ("hf-chat-on-embedding-model", "POST", f"{HF}/v1/chat/completions", b'{"messages": []}', 400, "validation"),
    ("hf-similarity-bad-inputs", "POST", SIM, b'{"inputs": "just a string"}', 400, "validation"),
    (
        "hf-similarity-no-sentences",
        "POST",
        SIM,
        b'{"inputs": {"source_sentence": "a", "sentences": []}}',
        400,
        "validation",
    ),
    ("hf-similarity-missing-source", "POST", SIM, b'{"inputs": {"sentences": ["a"]}}', 400, "validation"),
    ("hf-no-model-in-url", "POST", "/", b'{"inputs": "x"}', 400, "validation"),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error_in_the_callers_dialect(mesh, name, method, path, body, status, code):
    reply = httpx.request(method, mesh.url + path, content=body, timeout=30)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers.get("x-request-id")
    payload = reply.json()
    assert "Traceback" not in reply.text
    if path.startswith("/v1/"):
        error = payload["error"]
        assert set(error) == {"message", "type", "code", "param"}
        assert error["code"] == code and error["message"]
    else:
        assert isinstance(payload["error"], str) and payload["error"]
        assert payload["error_type"] == code


def test_over_limit_text_is_truncated_by_default_on_hf_routes(mesh):
    reply = httpx.post(mesh.url + HF, json={"inputs": [LONG_TEXT, "short"]}, timeout=30)
    assert reply.status_code == 200
    assert len(reply.json()) == 2 and len(reply.json()[0]) == 384


def test_hf_options_object_is_accepted(mesh):
    reply = httpx.post(mesh.url + HF, json={"inputs": "x", "options": {"use_cache": False, "wait_for_model": True}})
    assert reply.status_code == 200


def test_unnormalized_embeddings_on_request(mesh):
    reply = httpx.post(mesh.url + HF, json={"inputs": "hello there", "normalize": False})
    assert reply.status_code == 200
    norm = sum(v * v for v in reply.json()) ** 0.5
    assert norm > 1.5  # raw mean-pooled MiniLM vectors are far from unit length


def test_request_id_is_the_gateways_and_the_callers_comes_back_beside_it(mesh):
    reply = httpx.post(mesh.url + HF, json={"inputs": "x"}, headers={"X-Request-Id": "req-42"})
    assert reply.headers["x-client-request-id"] == "req-42"
    assert reply.headers["x-request-id"] not in ("", "req-42")  # made by the gateway, unique


def test_mesh_keeps_serving_after_every_bad_request(mesh):
    # Runs after the table above in this worker: no worker crashed, nothing is wedged.
    ready = httpx.get(mesh.url + "/readyz")
    assert ready.status_code == 200 and all(ready.json()["checks"].values())
    assert httpx.post(mesh.url + EMB, content=emb(input="still fine")).status_code == 200

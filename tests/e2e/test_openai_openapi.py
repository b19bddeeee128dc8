"""Every new OpenAI body and stream chunk through a real mesh, validated against the schemas of
OpenAI's published OpenAPI document (vendored in tests/contract/openapi/openai_schemas.json):
chat with logprobs, top_logprobs and n=2; chat streams with usage on every chunk; json_schema
output; tools with tool_choice required (stream and not); completions with logprobs (stream and
not); embeddings as floats, as base64 and from token ids; and the error bodies of refused requests.
Bodies are read raw (httpx, the openai SDK's raw response): what the server sends, not what a
client makes of it. Our bodies may carry more fields than OpenAI's; they may not lack or mistype one."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from openapi_schema_validator import OAS31Validator

from tests.e2e.test_structured_output import SCHEMA, WEATHER
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")

LM = "meshserve/tiny-llama-chat"
ASK = [{"role": "user", "content": "What does the json module do?"}]


def nullable_as_null(node):
    """The document is OpenAPI 3.1 but keeps some 3.0 `nullable: true` (stream chunks'
    `finish_reason`, `logprobs` and `usage`), which 3.1 no longer reads: a field the authors mean
    may be null (OpenAI's own server sends null there) would refuse it. Read as they mean it: the
    schema, or null."""
    if isinstance(node, list):
        return [nullable_as_null(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: nullable_as_null(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


DOCUMENT = json.loads((Path(__file__).parents[1] / "contract" / "openapi" / "openai_schemas.json").read_text())
SCHEMAS = nullable_as_null(DOCUMENT["schemas"])


def _completion_chunk() -> dict:
    """A streamed completion chunk. The document says completion chunks share the body's shape,
    whose `finish_reason` may not be null, yet OpenAI's server (and vLLM, and every client) sends
    null on every chunk but a choice's last: that one field may be null here, nothing else."""
    chunk = json.loads(json.dumps(SCHEMAS["CreateCompletionResponse"]))
    reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {"anyOf": [reason, {"type": "null"}]}
    return chunk


def _base64_embeddings() -> dict:
    """An embeddings body of `encoding_format: base64`. The document types `embedding` as an array
    of numbers only, yet OpenAI answers base64 with a string (the openai SDK asks for base64 by
    default and decodes that string): the one field is a string here, nothing else."""
    body = json.loads(json.dumps(SCHEMAS["CreateEmbeddingResponse"]))
    item = {**SCHEMAS["Embedding"]}
    item["properties"] = {**item["properties"], "embedding": {"type": "string", "contentEncoding": "base64"}}
    body["properties"]["data"]["items"] = item
    return body


EXTRA = {"CompletionChunk": _completion_chunk(), "Base64Embeddings": _base64_embeddings()}


def check(name: str, value) -> None:
    """`value` is valid against schema `name` of OpenAI's document (its `$ref`s resolved in it)."""
    schema = {**(SCHEMAS.get(name) or EXTRA[name]), "components": {"schemas": SCHEMAS}}
    OAS31Validator(schema).validate(value)


def post(mesh, path: str, body: dict) -> dict:
    reply = httpx.post(mesh.url + path, json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def stream(mesh, path: str, body: dict) -> list[dict]:
    """The JSON events of an SSE stream, which must end with `data: [DONE]`."""
    events, done = [], False
    with httpx.stream("POST", mesh.url + path, json={**body, "stream": True}, timeout=120) as reply:
        assert reply.status_code == 200, reply.read().decode()
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                assert not line.strip(), line  # only data lines and the blank lines between them
                continue
            assert not done, "an event after [DONE]"
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[len("data: ") :]))
    assert done and events
    return events


# -- chat --------------------------------------------------------------------------------------


def test_chat_with_logprobs_and_two_choices(mesh):
    body = post(
        mesh, "/v1/chat/completions",
        {"model": LM, "messages": ASK, "max_tokens": 8, "n": 2, "logprobs": True, "top_logprobs": 3,
         "temperature": 1.0, "seed": 4},
    )  # fmt: skip
    check("CreateChatCompletionResponse", body)
    assert sorted(c["index"] for c in body["choices"]) == [0, 1]
    for choice in body["choices"]:
        content = choice["logprobs"]["content"]
        assert content and all(len(t["top_logprobs"]) == 3 for t in content)
    assert 0 < sum(len(c["logprobs"]["content"]) for c in body["choices"]) <= body["usage"]["completion_tokens"]


@pytest.mark.parametrize("n", [1, 2])
def test_chat_stream_chunks_with_usage_on_every_chunk_and_logprobs(mesh, n):
    events = stream(
        mesh, "/v1/chat/completions",
        {"model": LM, "messages": ASK, "max_tokens": 8, "n": n, "logprobs": True, "top_logprobs": 2,
         "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "temperature": 1.0, "seed": 3},
    )  # fmt: skip
    for event in events:
        check("CreateChatCompletionStreamResponse", event)
        assert event["usage"] is not None  # continuous_usage_stats: usage on every chunk
    assert events[-1]["choices"] == []  # include_usage: the last chunk has the usage alone
    finished = [c for e in events for c in e["choices"] if c["finish_reason"] is not None]
    assert sorted(c["index"] for c in finished) == list(range(n))
    tokens = sum(len((c["logprobs"] or {}).get("content") or []) for e in events for c in e["choices"])
    assert 0 < tokens <= events[-1]["usage"]["completion_tokens"]


@pytest.mark.parametrize("streamed", [False, True])
def test_chat_with_a_json_schema_response_format(mesh, streamed):
    request = {
        "model": LM, "messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 200,
        "temperature": 1.0, "seed": 6,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
    }  # fmt: skip
    if not streamed:
        body = post(mesh, "/v1/chat/completions", request)
        check("CreateChatCompletionResponse", body)
        text = body["choices"][0]["message"]["content"]
    else:
        events = stream(mesh, "/v1/chat/completions", {**request, "stream_options": {"include_usage": True}})
        for event in events:
            check("CreateChatCompletionStreamResponse", event)
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert isinstance(json.loads(text), dict)


def test_chat_with_a_required_tool_call(mesh):
    request = {
        "model": LM, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
        "tool_choice": "required", "temperature": 1.0, "seed": 5,
    }  # fmt: skip
    body = post(mesh, "/v1/chat/completions", request)
    check("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"][0]["type"] == "function"
    events = stream(mesh, "/v1/chat/completions", {**request, "stream_options": {"include_usage": True}})
    for event in events:
        check("CreateChatCompletionStreamResponse", event)
    calls = [tc for e in events for c in e["choices"] for tc in c["delta"].get("tool_calls") or []]
    assert calls and calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls))
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "tool_calls"


def test_chat_raw_response_of_the_openai_sdk(mesh):
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=LM, messages=ASK, max_tokens=4, logprobs=True, top_logprobs=1, n=2
    )
    check("CreateChatCompletionResponse", raw.http_response.json())
    assert len(raw.parse().choices) == 2


# -- completions -------------------------------------------------------------------------------


def test_completions_with_logprobs(mesh):
    request = {"model": LM, "prompt": "The json module", "max_tokens": 8, "logprobs": 3, "temperature": 1.0, "seed": 2}
    body = post(mesh, "/v1/completions", request)
    check("CreateCompletionResponse", body)
    logprobs = body["choices"][0]["logprobs"]
    assert 0 < len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) <= body["usage"]["completion_tokens"]
    events = stream(
        mesh, "/v1/completions",
        {**request, "n": 2, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )  # fmt: skip
    for event in events:
        check("CompletionChunk", event)
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"] is not None]
    assert len(reasons) == 2 and events[-1]["choices"] == []
    tokens = sum(len(c["logprobs"]["tokens"]) for e in events for c in e["choices"])
    assert 0 < tokens <= events[-1]["usage"]["completion_tokens"]


# -- embeddings --------------------------------------------------------------------------------


def test_embeddings_as_floats_base64_and_from_token_ids(mesh, reference_encoder):
    floats = post(mesh, "/v1/embeddings", {"model": MODEL_ID, "input": ["one sentence", "another"]})
    check("CreateEmbeddingResponse", floats)
    packed = post(mesh, "/v1/embeddings", {"model": MODEL_ID, "input": "one sentence", "encoding_format": "base64"})
    check("Base64Embeddings", packed)
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, floats["data"][0]["embedding"], atol=1e-5)
    ids = reference_encoder.tokenizer("one sentence")["input_ids"]
    for tokens in (ids, [ids, ids]):
        check("CreateEmbeddingResponse", post(mesh, "/v1/embeddings", {"model": MODEL_ID, "input": tokens}))
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused", max_retries=0)
    raw = client.embeddings.with_raw_response.create(model=MODEL_ID, input=["one sentence"])  # the SDK's defaults
    sent = json.loads(raw.http_request.content)
    check("Base64Embeddings" if sent.get("encoding_format") == "base64" else "CreateEmbeddingResponse",
          raw.http_response.json())  # fmt: skip
    np.testing.assert_allclose(raw.parse().data[0].embedding, floats["data"][0]["embedding"], atol=1e-5)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"model": LM, "messages": ASK, "logprobs": True, "top_logprobs": 21}),
        ("/v1/chat/completions", {"model": LM, "messages": ASK, "tools": [WEATHER], "n": 2}),
        ("/v1/chat/completions", {"model": LM, "messages": ASK, "response_format": {"type": "yaml"}}),
        ("/v1/chat/completions", {"model": LM, "messages": ASK, "no_such_field": 1}),
        ("/v1/completions", {"model": LM, "prompt": "a", "logprobs": 99}),
        ("/v1/embeddings", {"model": MODEL_ID, "input": [[-1, 5]]}),
        ("/v1/embeddings", {"model": "no/such-model", "input": "a"}),
    ],
)
def test_refused_requests_answer_openais_error_body(mesh, path, body):
    reply = httpx.post(mesh.url + path, json=body, timeout=60)
    assert 400 <= reply.status_code < 500, reply.text
    check("ErrorResponse", reply.json())

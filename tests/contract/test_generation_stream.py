"""ModelStreamInfer on the embedded server with a decoupled generation model, driven by
tritonclient.grpc.aio: one response per token, an empty final response with
`triton_final_response`, concurrent streams in one decode batch, cancellation, per-request errors.

The model is a tiny randomly initialised Llama saved in Hugging Face format by the test (the
server path does not depend on what the weights learnt); the catalog is the test's own."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import pytest_asyncio
import torch
import yaml
from tritonclient.grpc import InferInput
from tritonclient.grpc.aio import InferenceServerClient

from services.common.catalog import Catalog
from services.inference.main import create
from services.inference.settings import InferenceSettings
from services.models.build import build_all

MODEL = "tiny-llama"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(tmp_path_factory):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("generation")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=96, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp / "src")
    GenerationConfig(eos_token_id=96, pad_token_id=0).save_pretrained(tmp / "src")
    entry = {
        "id": "test/tiny-llama",
        "tasks": ["feature-extraction"],  # gateway tasks for generation come with the chat routes
        "source": {"kind": "path", "path": str(tmp / "src")},
        "inference": {
            "name": MODEL,
            "runtime": "causal_lm",
            "inputs": [{"name": "input_ids", "datatype": "INT64", "dims": [-1]}],
            "outputs": [{"name": "token_id", "datatype": "INT64", "dims": [1]}],
            "max_batch_size": 8,
        },
    }
    (tmp / "catalog.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    build_all(Catalog.load(tmp / "catalog.yaml"), tmp / "home" / "models")
    settings = InferenceSettings(
        home=tmp / "home", catalog=tmp / "catalog.yaml", grpc_port=0, http_port=-1, metrics_port=-1
    )
    running, repository = await create(settings)
    yield f"127.0.0.1:{running.port}", repository
    await running.stop(grace_s=2)


def request(prompt: list[int], request_id: str, **parameters) -> dict:
    ids = InferInput("input_ids", [len(prompt)], "INT64")
    ids.set_data_from_numpy(np.array(prompt, dtype=np.int64))
    return {"model_name": MODEL, "inputs": [ids], "request_id": request_id, "parameters": parameters}


async def run_stream(url: str, requests: list[dict], *, cancel_after: int | None = None):
    """Send the requests on one stream; collect (tokens, final parameters) per request id."""
    client = InferenceServerClient(url)

    async def send():
        for r in requests:
            yield r

    tokens: dict[str, list[int]] = {r["request_id"]: [] for r in requests}
    finals: dict[str, dict] = {}
    errors: list[str] = []
    responses = client.stream_infer(send())
    try:
        async for result, error in responses:
            if error is not None:
                errors.append(error.message())
                continue
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                finals[response.id] = {k: v for k, v in response.parameters.items()}
            else:
                tokens[response.id].append(int(result.as_numpy("token_id")[0]))
            if cancel_after is not None and sum(map(len, tokens.values())) >= cancel_after:
                responses.cancel()
                break
            if len(finals) + len(errors) == len(requests):
                break
    finally:
        await client.close()
    return tokens, finals, errors


@pytest.mark.asyncio(loop_scope="session")
async def test_greedy_stream_matches_generate_and_ends_with_a_final_response(server):
    url, repository = server
    tokens, finals, errors = await run_stream(url, [request([5, 6, 7], "a", max_tokens=10, temperature=0.0)])
    assert not errors
    runtime = repository.slots[MODEL].batcher.runtime
    with torch.inference_mode():
        expected = runtime.model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=10, do_sample=False)[0, 3:]
    expected = expected.tolist()
    expected = expected[: expected.index(96)] if 96 in expected else expected
    assert tokens["a"] == expected
    final = finals["a"]
    assert final["finish_reason"].string_param in ("length", "stop")
    assert final["completion_tokens"].int64_param == len(expected)
    assert final["prompt_tokens"].int64_param == 3


@pytest.mark.asyncio(loop_scope="session")
async def test_concurrent_streams_share_decode_steps(server):
    from services.inference.generation import DECODE_BATCH

    url, _ = server

    def ours():  # every scheduler registers its labels: read this model's series only
        return [s for s in DECODE_BATCH.collect()[0].samples if s.labels.get("model") == MODEL]

    before = [s for s in ours() if s.name.endswith("_bucket") and s.labels["le"] == "1.0"]
    ones_before = before[0].value if before else 0
    requests = [request([10 + i, 11 + i], str(i), max_tokens=20, temperature=0.8, seed=i) for i in range(4)]
    clients = [run_stream(url, [r]) for r in requests]
    results = await asyncio.gather(*clients)
    assert all(not errors and len(finals) == 1 for _, finals, errors in results)
    samples = {s.labels["le"]: s.value for s in ours() if s.name.endswith("_bucket")}
    count = next(s.value for s in ours() if s.name.endswith("_count"))
    assert count - samples["1.0"] > 0, "some decode steps ran more than one sequence"
    assert samples["1.0"] >= ones_before


@pytest.mark.asyncio(loop_scope="session")
async def test_client_cancel_stops_generation(server):
    from services.inference.generation import FINISHED

    url, _ = server

    def cancelled() -> float:
        return FINISHED.labels(MODEL, "cancelled")._value.get()

    before = cancelled()
    await run_stream(url, [request([3, 4], "c", max_tokens=100, temperature=1.0, seed=3)], cancel_after=3)
    for _ in range(100):
        if cancelled() > before:
            break
        await asyncio.sleep(0.02)
    assert cancelled() == before + 1


@pytest.mark.asyncio(loop_scope="session")
async def test_bad_requests_get_an_error_response_and_the_stream_goes_on(server):
    url, _ = server
    bad = request([500], "bad", max_tokens=5)  # token id outside the vocabulary
    wrong = request([1, 2], "wrong", top_p="x")
    good = request([1, 2], "good", max_tokens=3, temperature=0.0)
    tokens, finals, errors = await run_stream(url, [bad, wrong, good])
    assert len(errors) == 2 and any("outside" in e for e in errors) and any("number" in e for e in errors)
    assert "good" in finals and len(tokens["good"]) <= 3


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stream_error_names_its_code(server):
    """Besides Triton's `error_message`, the error response carries our code, so the gateway can
    answer a full queue with 503, not with the 400 of a bad request."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    url, _ = server
    bad = service_pb2.ModelInferRequest(model_name=MODEL, id="bad")
    bad.inputs.add(name="input_ids", datatype="INT64", shape=[1])
    bad.raw_input_contents.append(np.array([500], dtype="<i8").tobytes())  # outside the vocabulary

    async def one():
        yield bad

    async with grpc.aio.insecure_channel(url) as channel:
        responses = [r async for r in service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(one())]
    assert len(responses) == 1 and "outside" in responses[0].error_message
    assert responses[0].infer_response.id == "bad"
    assert responses[0].infer_response.parameters["error_code"].string_param == "invalid_input"


@pytest.mark.asyncio(loop_scope="session")
async def test_unary_infer_is_refused_for_a_decoupled_model(server):
    url, _ = server
    client = InferenceServerClient(url)
    try:
        ids = InferInput("input_ids", [1, 2], "INT64")
        ids.set_data_from_numpy(np.array([[1, 2]], dtype=np.int64))
        with pytest.raises(Exception, match="decoupled"):
            await client.infer(MODEL, [ids])
        config = await client.get_model_config(MODEL, as_json=True)
        assert config["config"]["model_transaction_policy"]["decoupled"] is True
    finally:
        await client.close()


async def token_responses(url: str, requests: list[dict]) -> dict[str, list[list[int]]]:
    """Send the requests on one stream; per request id, the token ids of each token response."""
    client = InferenceServerClient(url)

    async def send():
        for r in requests:
            yield r

    seen: dict[str, list[list[int]]] = {r["request_id"]: [] for r in requests}
    finals = 0
    try:
        async for result, error in client.stream_infer(send()):
            assert error is None, error.message()
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                finals += 1
                if finals == len(requests):
                    break
                continue
            ids, logprobs = result.as_numpy("token_id"), result.as_numpy("logprob")
            assert ids.shape == logprobs.shape and ids.ndim == 1
            seen[response.id].append(ids.tolist())
    finally:
        await client.close()
    return seen


def sampled(count: int, **parameters) -> list[dict]:
    """`count` seeded sampling requests (a seeded request repeats whatever it is batched with)."""
    return [
        request([10 + i, 20 + i], str(i), max_tokens=24, min_tokens=24, temperature=0.9, seed=i, **parameters)
        for i in range(count)
    ]


@pytest.mark.asyncio(loop_scope="session")
async def test_coalesced_responses_carry_the_same_tokens_in_order(server):
    """With `max_tokens_per_response`, responses may carry several tokens (8 streams of one model:
    every fourth step, after a ramp of 1 and 2); the tokens, concatenated, are the ones of one
    response per token."""
    url, _ = server
    one_each = await token_responses(url, sampled(8))
    coalesced = await token_responses(url, sampled(8, max_tokens_per_response=4))
    for rid, responses in one_each.items():
        assert all(len(ids) == 1 for ids in responses)
        joined = [t for ids in coalesced[rid] for t in ids]
        assert joined == [ids[0] for ids in responses] and len(joined) == 24
        assert len(coalesced[rid][0]) == 1  # the first token never waits
        assert len(coalesced[rid][1]) <= 2  # nor long for the next (the first may have no text)
        assert all(1 <= len(ids) <= 4 for ids in coalesced[rid])
    assert any(len(ids) > 1 for responses in coalesced.values() for ids in responses)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_raw_triton_stream_gets_one_response_per_token(server):
    """Without the parameter (a plain tritonclient user), many streams at once still get Triton's
    one response per token, `token_id` of shape [1]."""
    url, _ = server
    seen = await token_responses(url, sampled(8))
    assert all(len(ids) == 1 for responses in seen.values() for ids in responses)
    assert all(len(responses) == 24 for responses in seen.values())


@pytest.mark.asyncio(loop_scope="session")
async def test_a_bad_tokens_per_response_is_refused(server):
    url, _ = server
    _tokens, finals, errors = await run_stream(url, [request([1, 2], "z", max_tokens=3, max_tokens_per_response=0)])
    assert len(errors) == 1 and "max_tokens_per_response" in errors[0] and not finals

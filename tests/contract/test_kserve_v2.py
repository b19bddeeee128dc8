"""KServe v2 / Triton conformance over gRPC and HTTP/REST, driven by the real tritonclient
(`grpc.aio` and `http.aio`, through tests/contract/kserve_clients.py), on both backends."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.contract.kserve_clients import PROTOCOLS, KServeClient

pytestmark = pytest.mark.xdist_group("contract")

SENTENCES = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force between quarks."]


@pytest.fixture(params=PROTOCOLS)
async def client(request, inference_server):
    client = KServeClient(request.param, inference_server)
    yield client
    await client.close()


def encode(tokenizer, texts) -> tuple[np.ndarray, np.ndarray]:
    encodings = tokenizer.encode_batch(texts)
    return (
        np.array([e.ids for e in encodings], dtype=np.int64),
        np.array([e.attention_mask for e in encodings], dtype=np.int64),
    )


def infer_inputs(client: KServeClient, ids: np.ndarray, mask: np.ndarray, dtype: str = "INT64", **binary) -> list:
    """`binary`: set_data_from_numpy's binary_data (HTTP only: JSON `data` when False)."""
    a = client.input("input_ids", list(ids.shape), dtype)
    a.set_data_from_numpy(ids if dtype == "INT64" else ids.astype(np.float32), **binary)
    b = client.input("attention_mask", list(mask.shape), "INT64")
    b.set_data_from_numpy(mask, **binary)
    return [a, b]


async def test_server_live_ready_and_metadata(client):
    assert await client.is_server_live()
    assert await client.is_server_ready()
    meta = await client.server_metadata()
    assert meta["name"] and meta["version"]


async def test_model_ready_metadata_and_config(client, model_name, catalog):
    assert await client.is_model_ready(model_name)
    meta = await client.model_metadata(model_name)
    assert meta["name"] == model_name and meta["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "input_ids": ("INT64", [-1, -1]),
        "attention_mask": ("INT64", [-1, -1]),
    }
    assert meta["outputs"][0]["name"] == "embedding" and meta["outputs"][0]["shape"] == [-1, 384]
    config = await client.model_config(model_name)
    spec = catalog.models[0].inference
    assert config["max_batch_size"] == spec.max_batch_size
    assert config["dynamic_batching"]["preferred_batch_size"] == list(spec.preferred_batch_sizes)
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


async def test_infer_with_raw_tensors_matches_sentence_transformers(client, model_name, tokenizer, reference_encoder):
    ids, mask = encode(tokenizer, SENTENCES)
    result = await client.infer(model_name, infer_inputs(client, ids, mask), outputs=[client.output("embedding")])
    pooled = result.as_numpy("embedding")
    assert pooled.shape == (2, 384) and pooled.dtype == np.float32
    normalized = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(normalized, reference_encoder.encode(SENTENCES, normalize_embeddings=True), atol=1e-5)


async def test_concurrent_requests_are_batched(client, model_name, tokenizer):
    before = await client.model_stats(model_name)
    # Long enough that one execution outlasts the client's time to send the next requests.
    texts = [f"request number {i} with a few words" + " and then some more words" * (8 + i % 5) for i in range(64)]
    singles = [encode(tokenizer, [t]) for t in texts]
    results = await asyncio.gather(*(client.infer(model_name, infer_inputs(client, *s)) for s in singles))
    for _ in range(50):  # Triton updates its statistics just after the responses go out
        after = await client.model_stats(model_name)
        inferences = after.get("inference_count", 0) - before.get("inference_count", 0)
        if inferences >= len(texts):
            break
        await asyncio.sleep(0.05)
    executions = after.get("execution_count", 0) - before.get("execution_count", 0)
    assert inferences == len(texts)
    assert executions < inferences, "concurrent requests must share executions"
    # Each request got its own row back, padded across requests of different lengths.
    alone = (await client.infer(model_name, infer_inputs(client, *singles[7]))).as_numpy("embedding")
    np.testing.assert_allclose(results[7].as_numpy("embedding"), alone, atol=1e-5)
    assert any(int(b["batch_size"]) > 1 for b in after["batch_stats"])


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("unknown-model", "unknown model"),
        ("wrong-dtype", "data-type"),
        ("wrong-shape", "unexpected shape"),
        ("batch-mismatch", "batch size does not match other inputs"),
        ("missing-input", "missing required input"),
        ("batch-too-large", "batch-size must be"),
    ],
)
async def test_bad_requests_are_refused_with_triton_messages(client, model_name, tokenizer, case, expect):
    ids, mask = encode(tokenizer, ["hello"])
    name, inputs = model_name, infer_inputs(client, ids, mask)
    if case == "unknown-model":
        name = "no-such-model"
    elif case == "wrong-dtype":
        inputs = infer_inputs(client, ids, mask, dtype="FP32")
    elif case == "wrong-shape":
        extra_dim = client.input("input_ids", [1, ids.size, 1], "INT64")
        extra_dim.set_data_from_numpy(ids.reshape(1, -1, 1))
        inputs = [extra_dim, inputs[1]]
    elif case == "batch-mismatch":
        inputs = infer_inputs(client, np.repeat(ids, 2, axis=0), mask)
    elif case == "missing-input":
        inputs = inputs[:1]
    elif case == "batch-too-large":
        inputs = infer_inputs(client, np.repeat(ids, 33, axis=0), np.repeat(mask, 33, axis=0))
    with pytest.raises(InferenceServerException) as err:
        await client.infer(name, inputs)
    assert expect in err.value.message()
    assert await client.is_server_live()  # nothing crashed


@pytest.mark.parametrize(
    ("case", "expect"),
    [("token-out-of-vocabulary", "outside"), ("mask-not-binary", "only 0 and 1"), ("no-tokens", "no tokens")],
)
async def test_a_bad_request_fails_alone_while_its_batch_mates_succeed(client, model_name, tokenizer, case, expect):
    ids, mask = encode(tokenizer, ["a perfectly fine sentence"])
    if case == "token-out-of-vocabulary":
        bad = infer_inputs(client, np.full_like(ids, 10_000_000), mask)
    elif case == "mask-not-binary":
        bad = infer_inputs(client, ids, mask * 7)
    else:
        bad = infer_inputs(client, ids[:, :0], mask[:, :0])
    good = [client.infer(model_name, infer_inputs(client, ids, mask)) for _ in range(12)]
    results = await asyncio.gather(*good[:6], client.infer(model_name, bad), *good[6:], return_exceptions=True)
    assert isinstance(results[6], InferenceServerException) and expect in results[6].message()
    assert all(r.as_numpy("embedding").shape == (1, 384) for i, r in enumerate(results) if i != 6)


async def test_repository_index_lists_the_catalog(client, model_name):
    index = await client.index()
    assert {"name": model_name, "version": "1", "state": "READY"}.items() <= index[0].items()


async def test_unload_and_load_change_readiness(client, model_name, tokenizer):
    await client.unload_model(model_name)
    try:
        # Triton unloads in the background (UNLOADING, then UNAVAILABLE); ours is immediate.
        for _ in range(100):
            index = await client.index()
            if index[0]["state"] == "UNAVAILABLE":
                break
            assert index[0]["state"] == "UNLOADING"
            await asyncio.sleep(0.1)
        assert index[0]["state"] == "UNAVAILABLE"
        assert not await client.is_model_ready(model_name)
        with pytest.raises(InferenceServerException):
            await client.infer(model_name, infer_inputs(client, *encode(tokenizer, ["x"])))
    finally:
        await client.load_model(model_name)
    assert await client.is_model_ready(model_name)
    result = await client.infer(model_name, infer_inputs(client, *encode(tokenizer, ["back again"])))
    assert result.as_numpy("embedding").shape == (1, 384)


async def test_shared_memory_status_is_empty_when_nothing_is_registered(client):
    assert await client.shared_memory_regions() == []


async def test_unsupported_methods_say_so(client, inference_server):
    if inference_server["backend"] == "triton":
        pytest.skip("Triton implements shared-memory registration")
    with pytest.raises(InferenceServerException) as err:
        await client.register_system_shared_memory("region", "/meshserve-test", 64)
    assert "not supported" in err.value.message()


async def test_model_is_not_ready_while_it_loads(client, model_name, tokenizer, inference_server):
    await client.unload_model(model_name)
    for _ in range(100):
        if (await client.index())[0]["state"] == "UNAVAILABLE":
            break
        await asyncio.sleep(0.1)
    load = asyncio.create_task(client.load_model(model_name))
    states = []
    try:
        while not load.done():
            # Readiness first, state second: a model that was ready cannot be LOADING afterwards.
            ready = await client.is_model_ready(model_name)
            state = (await client.index())[0]["state"]
            states.append(state)
            if ready:
                assert state == "READY", f"ready, then {state}"
            await asyncio.sleep(0.02)
    finally:
        await load
    if (inference_server["backend"], client.protocol) != ("triton", "http"):
        # Triton's HTTP endpoint answers these calls only once the load is over (measured, 2.51):
        # there is nothing to see between UNAVAILABLE and READY.
        assert "LOADING" in states, states
    assert await client.is_model_ready(model_name)
    result = await client.infer(model_name, infer_inputs(client, *encode(tokenizer, ["loaded again"])))
    assert result.as_numpy("embedding").shape == (1, 384)

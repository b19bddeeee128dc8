"""Text generation and chat through every hop with the real clients: openai (chat stream and not,
include_usage, completions), huggingface_hub (chat_completion stream, text_generation plain,
details and stream), the typed gRPC stream; a client that leaves mid-stream stops its generation;
concurrent streams share decode steps."""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from meshserve.gateway.v1 import gateway_pb2
from meshserve.tasks.v1 import tasks_pb2
from openai import OpenAI

pytestmark = pytest.mark.xdist_group("mesh")

LM = "meshserve/tiny-llama-chat"
HELLO = [{"role": "user", "content": "What does the json module do?"}]


def metric(mesh, name: str, **labels) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.ports['inf_m']}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def openai_client(mesh):
    return OpenAI(base_url=mesh.url + "/v1", api_key="unused", max_retries=0)


def test_openai_chat_non_stream_with_usage(mesh, openai_client):
    reply = openai_client.chat.completions.create(model=LM, messages=HELLO, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == LM and reply.object == "chat.completion"


def test_openai_chat_stream_matches_non_stream_and_reports_usage(mesh, openai_client):
    full = openai_client.chat.completions.create(model=LM, messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(
        openai_client.chat.completions.create(
            model=LM, messages=HELLO, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == full.usage.completion_tokens


def test_openai_completions_and_stop_strings(mesh, openai_client):
    reply = openai_client.completions.create(model=LM, prompt="The module", max_tokens=20, temperature=0)
    text = reply.choices[0].text
    assert text and reply.object == "text_completion"
    words = re.findall(r"[a-z]{3,}", text)
    if words:  # a stop string that occurs in the greedy output ends it right before
        stop = words[len(words) // 2]
        stopped = openai_client.completions.create(
            model=LM, prompt="The module", max_tokens=20, temperature=0, stop=[stop]
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == text[: text.index(stop)]
    stream = list(
        openai_client.completions.create(model=LM, prompt="The module", max_tokens=20, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_min_tokens_makes_fixed_length_generations(mesh, openai_client):
    """vLLM's `min_tokens` (what fixed-length benchmarks send): the end token waits until then."""
    reply = openai_client.chat.completions.create(
        model=LM, messages=HELLO, max_tokens=40, temperature=0, extra_body={"min_tokens": 40}
    )
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.chat.completions.create(model=LM, messages=HELLO, max_tokens=8, extra_body={"min_tokens": 9})
    assert refused.value.body["param"] == "min_tokens"


def test_hf_chat_completion_stream(mesh):
    client = InferenceClient(model=f"{mesh.url}/models/{LM}")
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat_completion(HELLO, max_tokens=10, stream=True, temperature=0)
    ]
    full = client.chat_completion(HELLO, max_tokens=10, temperature=0)
    assert "".join(parts) == full.choices[0].message.content


def test_hf_text_generation_plain_details_and_stream(mesh):
    client = InferenceClient(model=f"{mesh.url}/models/{LM}")
    text = client.text_generation("The os module", max_new_tokens=12, temperature=0.01, seed=3)
    assert isinstance(text, str) and text
    details = client.text_generation("The os module", max_new_tokens=12, details=True, seed=3, temperature=0.01)
    assert details.generated_text == text
    assert details.details.generated_tokens == len(details.details.tokens) <= 12
    assert all(isinstance(t.logprob, float) and t.logprob <= 0 for t in details.details.tokens)
    streamed = list(
        client.text_generation("The os module", max_new_tokens=12, stream=True, details=True, seed=3, temperature=0.01)
    )
    assert streamed[-1].generated_text == text and all(e.token is not None for e in streamed)
    assert streamed[-1].details.finish_reason in ("length", "eos_token", "stop_sequence")


def test_grpc_generate_streams_tokens(mesh):
    from meshserve.gateway.v1 import gateway_pb2_grpc

    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        request = gateway_pb2.GenerateRequest(
            model_id=LM,
            messages=[tasks_pb2.ChatMessage(role="user", content="Hello")],
            parameters=tasks_pb2.GenerationParameters(max_new_tokens=8, temperature=0),
        )
        responses = list(stub.Generate(request))
    assert responses[-1].finish_reason in ("stop", "length")
    assert responses[-1].usage.output_tokens == len(responses) - 1


def test_grpc_generate_takes_min_new_tokens(mesh):
    from meshserve.gateway.v1 import gateway_pb2_grpc

    def generate(**parameters):
        request = gateway_pb2.GenerateRequest(
            model_id=LM,
            messages=[tasks_pb2.ChatMessage(role="user", content="Hello")],
            parameters=tasks_pb2.GenerationParameters(temperature=0, **parameters),
        )
        return list(stub.Generate(request))

    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        responses = generate(max_new_tokens=24, min_new_tokens=24)
        with pytest.raises(grpc.RpcError) as refused:
            generate(max_new_tokens=4, min_new_tokens=5)
    assert responses[-1].usage.output_tokens == 24 and responses[-1].finish_reason == "length"
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_tokens" in refused.value.details()


def skip_on_triton(mesh) -> None:
    if mesh.backend == "triton":
        pytest.skip("the scheduler runs inside Triton's Python stub there; its metrics are not on Triton's endpoint")


def test_a_client_that_disconnects_stops_its_generation(mesh):
    skip_on_triton(mesh)
    tail = "meshserve_inference_tokens_after_cancel"
    before = {
        "cancelled": metric(mesh, "meshserve_inference_sequences_total", reason="cancelled"),
        "generated": metric(mesh, "meshserve_inference_generated_tokens_total"),
        "count": metric(mesh, f"{tail}_count"),
        "within_one": metric(mesh, f"{tail}_bucket", le="1.0"),
    }
    # Temperature 2 flattens the tiny model's distribution so that it rarely picks its end token:
    # at 1.0 it may finish its ~12-token answer before the client leaves (seen once in CI).
    # min_tokens rules the end token out altogether: the stream cannot finish before the client leaves.
    body = {"model": LM, "messages": HELLO, "max_tokens": 400, "min_tokens": 400, "temperature": 2.0, "stream": True}
    with httpx.stream("POST", f"{mesh.url}/v1/chat/completions", json=body, timeout=30) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 6:
                break  # leave after a few tokens: closing the connection cancels every hop
    deadline = time.monotonic() + 60  # ends as soon as the cancellation is counted
    while metric(mesh, "meshserve_inference_sequences_total", reason="cancelled") == before["cancelled"]:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    # How many tokens were made before the cancellation arrived depends on how fast this process
    # read (on a loaded machine the server runs ahead of the client); what the scheduler does once
    # it knows is exact: the sequence leaves at the next step, at most one token later.
    made = metric(mesh, "meshserve_inference_generated_tokens_total") - before["generated"]
    assert made < 400, "the generation ran to max_tokens although its client left"
    assert metric(mesh, f"{tail}_count") - before["count"] == 1
    assert metric(mesh, f"{tail}_bucket", le="1.0") - before["within_one"] == 1


def test_concurrent_streams_share_decode_steps(mesh):
    skip_on_triton(mesh)

    def buckets() -> tuple[float, float]:
        text = httpx.get(f"http://127.0.0.1:{mesh.ports['inf_m']}/metrics").text
        one = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("meshserve_inference_decode_batch_size_bucket") and 'le="1.0"' in line)  # fmt: skip
        count = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("meshserve_inference_decode_batch_size_count"))  # fmt: skip
        return one, count

    one_before, count_before = buckets()

    async def one_stream(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": LM, "messages": HELLO, "max_tokens": 24, "temperature": 0.8, "seed": i, "stream": True}
        async with client.stream("POST", f"{mesh.url}/v1/chat/completions", json=body) as response:
            return "".join([line async for line in response.aiter_lines()])

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one_stream(client, i) for i in range(6)))

    bodies = asyncio.run(run())
    assert all(b.endswith("data: [DONE]") for b in bodies)
    one_after, count_after = buckets()
    assert (count_after - count_before) - (one_after - one_before) > 0, "no decode step ran more than one sequence"


def test_generation_errors_are_clear(mesh, openai_client):
    import openai

    with pytest.raises(openai.BadRequestError, match="n"):
        openai_client.chat.completions.create(model=LM, messages=HELLO, n=17)  # at most 16 choices
    with pytest.raises(openai.BadRequestError, match=r"max_tokens|allows"):
        openai_client.chat.completions.create(model=LM, messages=HELLO, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="does not generate"):
        openai_client.chat.completions.create(model="sentence-transformers/all-MiniLM-L6-v2", messages=HELLO)
    reply = httpx.post(f"{mesh.url}/v1/chat/completions", json={"model": LM, "messages": []})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"

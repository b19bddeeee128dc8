"""Streams that share the decode batch get several tokens per inference response (our embedded
server, when the gateway allows it): what every client sees is unchanged. TGI still gets one
event per token, each with its own id and text, and the generated text is the decode of those
ids; OpenAI chat streams made together carry the text their non-streamed twins return."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

pytestmark = pytest.mark.xdist_group("mesh")

LM = "meshserve/tiny-llama-chat"
STREAMS = 8  # enough for the embedded server to send several steps' tokens together
TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer(models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models_dir / LM / "model"))


def tgi_stream(url: str, seed: int) -> list:
    client = InferenceClient(model=f"{url}/models/{LM}")
    prompt = f"The os module, part {seed}, lets you"
    return list(
        client.text_generation(prompt, max_new_tokens=TOKENS, stream=True, details=True, seed=seed, temperature=0.9)
    )


def test_concurrent_tgi_streams_send_one_event_per_token(mesh, tokenizer):
    with ThreadPoolExecutor(STREAMS) as pool:
        streams = list(pool.map(lambda seed: tgi_stream(mesh.url, seed), range(STREAMS)))
    counts = []
    for events in streams:
        ids = [e.token.id for e in events if not e.token.special]
        counts.append(len(ids))
        assert [e.index for e in events] == list(range(1, len(events) + 1))
        assert events[-1].details.generated_tokens == len(ids)
        assert [e.token.text for e in events if not e.token.special] == [
            tokenizer.decode([t], skip_special_tokens=True, clean_up_tokenization_spaces=False) for t in ids
        ]
        assert events[-1].generated_text == tokenizer.decode(ids, skip_special_tokens=True)
        assert all(e.generated_text is None for e in events[:-1])
    assert sum(counts) > 2 * STREAMS, counts  # most streams made several tokens (an end token may come first)


def test_concurrent_chat_streams_carry_the_text_of_their_non_streamed_twins(mesh):
    client = OpenAI(base_url=mesh.url + "/v1", api_key="unused", max_retries=0)

    def chat(seed: int, stream: bool):
        messages = [{"role": "user", "content": f"Tell me about item {seed}."}]
        args = dict(model=LM, messages=messages, max_tokens=TOKENS, temperature=0.9, seed=seed)
        if not stream:
            reply = client.chat.completions.create(**args)
            return reply.choices[0].message.content, reply.usage.completion_tokens
        chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(STREAMS) as pool:
        streamed = list(pool.map(lambda seed: chat(seed, True), range(STREAMS)))
        whole = list(pool.map(lambda seed: chat(seed, False), range(STREAMS)))
    assert streamed == whole

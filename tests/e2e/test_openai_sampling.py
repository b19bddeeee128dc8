"""OpenAI's sampling surface and vLLM's extras through every hop, with the unmodified openai SDK:
logprobs (chat and completions, stream and not), n > 1, frequency/presence penalties, logit_bias,
ignore_eos, the extra_body fields (top_k, min_p, repetition_penalty, stop_token_ids,
skip_special_tokens), stream_options.continuous_usage_stats, and 400s in OpenAI's error body."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from services.common.modelstore import model_dir

pytestmark = pytest.mark.xdist_group("mesh")

LM = "meshserve/tiny-llama-chat"
HELLO = [{"role": "user", "content": "What does the json module do?"}]


@pytest.fixture
def client(mesh):
    return OpenAI(base_url=mesh.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(catalog, models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir(catalog.get(LM), models_dir)))


def test_chat_logprobs_are_sorted_and_greedy_picks_the_top_one(mesh, client):
    reply = client.chat.completions.create(
        model=LM, messages=HELLO, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens > 0
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy: the chosen token is the top one
        assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].token == entry.token or not entry.token
    no_top = client.chat.completions.create(model=LM, messages=HELLO, max_tokens=4, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in no_top.choices[0].logprobs.content] == [[]] * no_top.usage.completion_tokens
    plain = client.chat.completions.create(model=LM, messages=HELLO, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_stream_carries_every_tokens_logprobs(mesh, client):
    whole = client.chat.completions.create(
        model=LM, messages=HELLO, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    chunks = list(
        client.chat.completions.create(
            model=LM, messages=HELLO, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
    )
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    expected = whole.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in expected]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in expected], abs=1e-5)


def test_completion_logprobs_in_the_legacy_shape(mesh, client):
    reply = client.completions.create(model=LM, prompt="The module", max_tokens=6, temperature=0, logprobs=3)
    lp, text = reply.choices[0].logprobs, reply.choices[0].text
    n = reply.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and top[token] == pytest.approx(logprob) and 3 <= len(top) <= 4
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)
    assert text
    stream = list(
        client.completions.create(model=LM, prompt="The module", max_tokens=6, temperature=0, logprobs=3, stream=True)
    )
    tokens = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_n_choices_are_distinct_seeded_and_summed(mesh, client):
    args = {"model": LM, "messages": HELLO, "max_tokens": 16, "temperature": 1.0, "seed": 7, "n": 3}
    reply = client.chat.completions.create(**args)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) == 3, texts
    assert client.chat.completions.create(**args).choices[1].message.content == texts[1]  # seed + 1
    one = client.chat.completions.create(**{**args, "n": 1, "seed": 8})
    assert one.choices[0].message.content == texts[1]
    counts = [c for c in [client.chat.completions.create(**{**args, "n": 1, "seed": 7 + i}) for i in range(3)]]
    assert reply.usage.completion_tokens == sum(c.usage.completion_tokens for c in counts)
    assert reply.usage.prompt_tokens == counts[0].usage.prompt_tokens
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = {i: "" for i in range(3)}
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(3)] == texts and sorted(finishes) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_n_and_best_of(mesh, client):
    reply = client.completions.create(
        model=LM, prompt="The module", max_tokens=8, temperature=1, seed=3, n=2, best_of=2
    )
    assert [c.index for c in reply.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=LM, prompt="The module", max_tokens=8, n=1, best_of=3)


def test_penalties_change_greedy_output(mesh, client):
    # 48 tokens past the end token: a 4M-parameter model's greedy text repeats tokens (checked), and
    # the penalties (up to 4 logits on each repeated one) must change it, whatever its weights.
    args = {"model": LM, "messages": HELLO, "max_tokens": 48, "temperature": 0, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**args, logprobs=True).choices[0]
    tokens = [t.token for t in plain.logprobs.content]
    assert len(tokens) == 48 and len(set(tokens)) < len(tokens)
    plain = plain.message.content
    penalized = client.chat.completions.create(**args, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].message.content != plain
    again = client.chat.completions.create(**args, frequency_penalty=2.0, presence_penalty=2.0)
    assert again.choices[0].message.content == penalized.choices[0].message.content  # still greedy


def test_logit_bias_forces_a_token_and_ignore_eos_runs_to_max_tokens(mesh, client, tokenizer):
    token = tokenizer.encode(" the", add_special_tokens=False)[-1]
    forced = client.completions.create(
        model=LM, prompt="The module", max_tokens=5, temperature=1.0, seed=1, logit_bias={str(token): 100}, logprobs=0
    )
    text = tokenizer.decode([token], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert forced.choices[0].logprobs.tokens == [text] * 5
    eos = tokenizer.eos_token_id
    ended = client.completions.create(model=LM, prompt="The module", max_tokens=10, logit_bias={str(eos): 100})
    assert ended.usage.completion_tokens == 0 and ended.choices[0].finish_reason == "stop"
    kept = client.completions.create(
        model=LM, prompt="The module", max_tokens=10, logit_bias={str(eos): 100}, extra_body={"ignore_eos": True}
    )
    assert kept.usage.completion_tokens == 10 and kept.choices[0].finish_reason == "length"


def test_vllm_extras_and_continuous_usage(mesh, client, tokenizer):
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "skip_special_tokens": True, "ignore_eos": True}
    reply = client.chat.completions.create(
        model=LM, messages=HELLO, max_tokens=12, temperature=0.8, seed=5, extra_body=extra
    )
    assert reply.usage.completion_tokens == 12
    # stop_token_ids: force a token, then name it as a stop token: nothing is generated
    token = tokenizer.encode(" the", add_special_tokens=False)[-1]
    stopped = client.completions.create(
        model=LM,
        prompt="The module",
        max_tokens=8,
        logit_bias={str(token): 100},
        extra_body={"stop_token_ids": [token]},
    )
    assert stopped.usage.completion_tokens == 0 and stopped.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model=LM, messages=HELLO, max_tokens=8, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )  # fmt: skip
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 17}, "n"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": -2}, "top_k"),
        ({"skip_special_tokens": False}, "skip_special_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [99999], "min_tokens": 2}, "stop_token_ids"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"guided_json": {}}, "guided_json"),
    ],
)
def test_bad_sampling_values_are_400_in_openai_shape(mesh, extra, param):
    body = {"model": LM, "messages": HELLO, "max_tokens": 4, **extra}
    reply = httpx.post(f"{mesh.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and param in error["message"] + str(error.get("param"))


@pytest.mark.parametrize(
    ("route", "bad"),
    [("chat", {"logit_bias": {"99999": 5}}), ("completions", {"logit_bias": {"99999": 5}}),
     ("chat", {"stop_token_ids": [99999], "min_tokens": 2})],
)  # fmt: skip
def test_a_stream_the_runtime_refuses_is_a_400_before_any_event(mesh, route, bad):
    """What only the runtime can check (token ids past the vocabulary) is refused before the
    stream's 200, in OpenAI's shape, as without `stream` (not a 200 and then an error event)."""
    body = {"model": LM, "max_tokens": 4, "stream": True, **bad}
    body |= {"messages": HELLO} if route == "chat" else {"prompt": "hello"}
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    with httpx.stream("POST", f"{mesh.url}{path}", json=body, timeout=60) as reply:
        reply.read()
    assert reply.status_code == 400, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    (param,) = bad.keys() - {"min_tokens"}
    assert error["type"] == "invalid_request_error" and param in error["message"] + str(error.get("param"))
    # The same request without the bad ids streams as before.
    body.pop(param)
    with httpx.stream("POST", f"{mesh.url}{path}", json=body, timeout=60) as reply:
        events = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert reply.status_code == 200 and events[-1] == "data: [DONE]" and len(events) >= 2


@pytest.mark.parametrize("penalty", [1e-300, 100.0])  # 100: the schema's upper bound
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_an_extreme_repetition_penalty_still_generates(mesh, penalty, temperature):
    """A penalty near 0 divides logits to +inf (NaN probabilities, once a 500); a large one pushes
    them far apart: either way the answer is tokens with finite logprobs."""
    body = {"model": LM, "messages": HELLO, "max_tokens": 4, "seed": 1, "logprobs": True}
    body |= {"repetition_penalty": penalty, "temperature": temperature}
    reply = httpx.post(f"{mesh.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    tokens = answer["choices"][0]["logprobs"]["content"]
    assert answer["usage"]["completion_tokens"] == len(tokens) >= 1
    assert all(-1e9 < t["logprob"] <= 0 for t in tokens)

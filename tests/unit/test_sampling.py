"""The sampler's OpenAI and vLLM extras on hand-made logits: frequency and presence penalties,
logit_bias, min_p, ignore_eos, raw logprobs with their top alternatives; the ranges, and the
request parameters as the inference service reads them (KServe parameters, Triton's JSON)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch

from services.common.errors import MeshError
from services.inference.constraints import Grammars
from services.inference.core import sampling_from_json, sampling_from_values
from services.inference.generation import GenerationScheduler, SamplingParams, Sequence, parse_logit_bias

VOCAB = 16


def scheduler(eos: int = 1) -> GenerationScheduler:
    out = GenerationScheduler.__new__(GenerationScheduler)
    out._torch, out.runtime = torch, SimpleNamespace(eos_token_ids=frozenset({eos}), vocab_size=VOCAB)
    out._grammars = Grammars(out.runtime)  # no row has one: the structured-output mask is a no-op
    out._outbox = []  # the engine turn's events (`_emit`)
    return out


def row(generated=(), seed: int = 0, **params) -> Sequence:
    seq = Sequence([0], SamplingParams(**params), asyncio.Queue())
    seq.generated = list(generated)
    seq.generator = torch.Generator().manual_seed(seed)
    return seq


def logits(*rows: list[float]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.tensor(rows, dtype=torch.float32)


def base() -> list[float]:
    values = [0.0] * VOCAB
    values[3], values[4], values[5] = 5.0, 4.5, 1.0
    return values


def test_frequency_and_presence_penalties_follow_openai():
    s = scheduler()
    # token 3 generated twice: 5 - 2 * 1.0 - 0.5 = 2.5 < 4.5, so greedy moves to token 4
    seq = row([3, 3], temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5)
    assert s._sample_rows(logits(base()), [seq])[0][0] == 4
    assert s._sample_rows(logits(base()), [row([3, 3], temperature=0.0)])[0][0] == 3
    # a negative presence penalty favours what was said
    favoured = row([5, 5], temperature=0.0, presence_penalty=-2.0, frequency_penalty=-2.0)  # 1 + 4 + 2 > 5
    assert s._sample_rows(logits(base()), [favoured])[0][0] == 5


def test_logit_bias_forces_or_bans_a_token_per_row():
    s = scheduler()
    forced = row(temperature=1.0, logit_bias=((9, 100.0),))
    banned = row(temperature=0.0, logit_bias=((3, -100.0),))
    plain = row(temperature=0.0)
    tokens = [t for t, _ in s._sample_rows(logits(base(), base(), base()), [forced, banned, plain])]
    assert tokens == [9, 4, 3]


def test_min_p_drops_unlikely_tokens():
    s = scheduler()
    draws = {s._sample_rows(logits(base()), [row(seed=i, min_p=0.5)])[0][0] for i in range(200)}
    assert draws == {3, 4}  # p(5) and the rest are far below half of p(3)
    wide = {s._sample_rows(logits(base()), [row(seed=i)])[0][0] for i in range(400)}
    assert len(wide) > 2


def test_raw_logprobs_and_top_alternatives_ignore_the_sampling_transforms():
    s = scheduler()
    seq = row(temperature=0.3, logprobs=True, top_logprobs=3, logit_bias=((5, 100.0),))
    [(token, logprob)] = s._sample_rows(logits(base()), [seq])
    raw = torch.log_softmax(torch.tensor(base()), -1)
    assert token == 5 and logprob == pytest.approx(float(raw[5]))  # the model's, not the biased one
    assert [t for t, _ in seq.top] == [3, 4, 5]
    assert [lp for _, lp in seq.top] == pytest.approx(raw[[3, 4, 5]].tolist())
    plain = row(temperature=0.0)
    s._sample_rows(logits(base()), [plain])
    assert plain.top is None


def test_ignore_eos_keeps_going_and_stop_token_ids_still_end():
    s = scheduler(eos=1)
    s._emitted, s.runtime.max_context = 0, 100
    s._metrics = SimpleNamespace(ttft=SimpleNamespace(observe=lambda _: None))
    finished = []
    s._finish = lambda seq, reason, **_: finished.append(reason)
    kept = row(ignore_eos=True, max_new_tokens=8)
    assert s._emit(kept, 1, 0.0, 0.0) and kept.generated == [1]
    assert [event.token_id for _, event in s._outbox] == [1]  # the token goes out with the turn
    ended = row(max_new_tokens=8)
    assert not s._emit(ended, 1, 0.0, 0.0) and finished == ["stop"]
    stopped = row(ignore_eos=True, max_new_tokens=8, stop_token_ids=(7,))
    assert not s._emit(stopped, 7, 0.0, 0.0) and finished == ["stop", "stop"]


@pytest.mark.parametrize(
    "params",
    [
        {"min_p": 1.5},
        {"frequency_penalty": 2.1},
        {"presence_penalty": -2.1},
        {"logit_bias": ((1, 101.0),)},
        {"logit_bias": tuple((i, 1.0) for i in range(301))},
        {"top_logprobs": 21},
    ],
)
def test_out_of_range_extras_are_refused(params):
    with pytest.raises(MeshError):
        SamplingParams(**params).validate()


def test_the_extras_travel_as_request_parameters():
    values = {
        "min_p": 0.1, "ignore_eos": True, "frequency_penalty": 0.5, "presence_penalty": -0.5,
        "logit_bias": json.dumps({"7": 3, "2": -1.5}), "logprobs": True, "top_logprobs": 4,
    }  # fmt: skip
    params = sampling_from_values(values, [9])
    assert params.logit_bias == ((2, -1.5), (7, 3.0)) and params.stop_token_ids == (9,)
    assert (params.min_p, params.ignore_eos, params.top_logprobs, params.logprobs) == (0.1, True, 4, True)
    assert sampling_from_json(json.dumps(values), []) == replace_stops(params)
    for bad in ("[1]", '{"x": 1}', '{"1": true}', "not json", 5):
        with pytest.raises(MeshError):
            parse_logit_bias(bad)


def replace_stops(params: SamplingParams) -> SamplingParams:
    from dataclasses import replace

    return replace(params, stop_token_ids=())

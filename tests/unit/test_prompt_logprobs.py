"""The prompt's log-probabilities (TGI's decoder_input_details) from the scheduler's prefill: one
event before the first token, equal to what the model gives the prompt run alone in transformers,
whether the prompt is prefilled alone or left-padded in a batch with others; sequences that did
not ask get no such event. The KServe parameter that asks for it travels like the sampling ones."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from tritonclient.grpc import service_pb2

from services.common.errors import MeshError
from services.inference.core import sampling_from_json, sampling_of
from services.inference.generation import GenerationScheduler, SamplingParams
from tests.unit.test_generation import SPEC, model_dir, runtime  # noqa: F401 (fixtures)

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13], [1, 20, 21, 22, 23]]


def reference(lm, prompt: list[int]) -> list[float]:
    """transformers alone: log-softmax of each position's logits at the next prompt token."""
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt])).logits[0]
    scores = torch.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(prompt[1:]).unsqueeze(1))
    return scores.squeeze(1).tolist()


async def events(stream) -> list:
    return [event async for event in stream]


@pytest.mark.parametrize("together", [1, 3], ids=["alone", "left-padded-batch"])
async def test_prompt_logprobs_come_first_and_match_transformers(runtime, together):  # noqa: F811
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    try:
        params = SamplingParams(max_new_tokens=3, temperature=0.0, prompt_logprobs=True)
        streams = [scheduler.submit(p, params) for p in PROMPTS[:together]]
        results = await asyncio.wait_for(asyncio.gather(*(events(s) for s in streams)), 30)
    finally:
        await scheduler.close()
    for prompt, got in zip(PROMPTS, results, strict=False):
        first, rest = got[0], got[1:]
        assert first.token_id is None and not first.final and len(first.prompt_logprobs) == len(prompt)
        assert math.isnan(first.prompt_logprobs[0])
        assert first.prompt_logprobs[1:] == pytest.approx(reference(runtime, prompt), abs=1e-4)
        assert all(e.prompt_logprobs is None for e in rest) and rest[-1].final


async def test_only_the_sequences_that_ask_get_prompt_logprobs(runtime):  # noqa: F811
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    try:
        scored = scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=2, temperature=0.0, prompt_logprobs=True))
        plain = scheduler.submit(PROMPTS[1], SamplingParams(max_new_tokens=2, temperature=0.0))
        with_scores, without = await asyncio.wait_for(asyncio.gather(events(scored), events(plain)), 30)
    finally:
        await scheduler.close()
    assert with_scores[0].prompt_logprobs is not None
    assert all(e.prompt_logprobs is None for e in without) and without[0].token_id is not None


def test_prompt_logprobs_parameter_from_kserve_and_triton_json():
    request = service_pb2.ModelInferRequest()
    request.parameters["prompt_logprobs"].bool_param = True
    request.parameters["max_tokens"].int64_param = 4
    assert sampling_of(request.parameters, []).prompt_logprobs is True
    assert sampling_from_json('{"prompt_logprobs": true}', []).prompt_logprobs is True
    assert sampling_from_json('{"max_tokens": 4}', []).prompt_logprobs is False
    with pytest.raises(MeshError, match="must be a boolean"):
        sampling_from_json('{"prompt_logprobs": 1}', [])

"""Users' chat LM folders (Llama, Qwen2): the chat template, end ids and sampling defaults come from
the folder, and greedy output through the openai SDK and InferenceClient equals transformers'
pipeline("text-generation") on the same folder."""

from __future__ import annotations

import asyncio

import pytest

from services.inference.generation import CausalLMRuntime, GenerationScheduler, SamplingParams
from services.models.from_folder import entry_from_folder
from services.preprocess.generation import GenerationPreprocessor
from tests.usermodels.factory import built
from tests.usermodels.folders_vision_lm import FOLDERS

pytestmark = pytest.mark.xdist_group("usermodels")

LMS = ("test/llama-chat", "test/qwen2-chat")
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What does the parser return for an empty string?"},
]
PROMPT = "The function returns the"
NEW_TOKENS = 12
DEFAULTS = {
    "test/llama-chat": {"temperature": 0.6, "top_p": 0.9},
    "test/qwen2-chat": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 2.0},
}


def _pipeline(folder):
    from transformers import pipeline

    return pipeline("text-generation", model=str(folder), device="cpu")


def hf_chat(folder) -> str:
    out = _pipeline(folder)(MESSAGES, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0]["generated_text"][-1]["content"]


def hf_completion(folder) -> str:
    out = _pipeline(folder)(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
    return out[0]["generated_text"]


@pytest.mark.parametrize("model_id", LMS)
def test_folder_template_end_ids_and_sampling_defaults_in_process(model_id):
    """Preprocess renders the folder's own template to the ids transformers makes; the stop ids are
    generation_config.json's list; a request that sets no sampling parameter gets the folder's."""
    from transformers import AutoTokenizer

    folder = built(model_id, FOLDERS[model_id])
    pre = GenerationPreprocessor(entry_from_folder(folder, model_id=model_id), folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert pre.chat_ids([(m["role"], m["content"]) for m in MESSAGES]) == list(expected["input_ids"])
    assert pre.stop_token_ids == sorted({2, 3} if model_id == "test/llama-chat" else {2})
    runtime = CausalLMRuntime(folder)
    assert runtime.sampling_defaults == DEFAULTS[model_id]
    resolved = SamplingParams(temperature=0.0).with_defaults(runtime.sampling_defaults)
    assert resolved.temperature == 0.0  # what the request set stays
    assert {k: getattr(resolved, k) for k in DEFAULTS[model_id] if k != "temperature"} == {
        k: v for k, v in DEFAULTS[model_id].items() if k != "temperature"
    }


@pytest.mark.parametrize("model_id", LMS)
def test_scheduler_greedy_equals_generate_with_the_folder_config(model_id):
    """Greedy decoding through the scheduler, with the folder's defaults (Qwen2's repetition penalty
    2.0 applies to greedy decoding too), equals generate() with the folder's generation config."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.common.catalog import InferenceSpec, TensorSpec

    folder = built(model_id, FOLDERS[model_id])
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    prompt = [5, 17, 40, 99, 7, 250]
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS)
        plain = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, repetition_penalty=1.0
        )
    expected = out[0, len(prompt) :].tolist()
    if "repetition_penalty" in DEFAULTS[model_id]:  # the folder's default changes this output
        assert plain[0, len(prompt) :].tolist() != expected
    spec = InferenceSpec(
        name="lm", runtime="causal_lm", max_batch_size=4, max_queue_size=8,
        inputs=(TensorSpec(name="input_ids", datatype="INT64", dims=(-1,)),),
        outputs=(TensorSpec(name="token_id", datatype="INT64", dims=(1,)),),
    )  # fmt: skip
    runtime = CausalLMRuntime(folder)

    async def run() -> list[int]:
        scheduler = GenerationScheduler("lm", runtime, spec)
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=tuple(runtime.eos_token_ids))
        tokens = [e.token_id async for e in scheduler.submit(prompt, params) if e.token_id is not None]
        await scheduler.close()
        return tokens

    ends = [i for i, t in enumerate(expected) if t in runtime.eos_token_ids]
    assert asyncio.run(run()) == (expected[: ends[0]] if ends else expected)  # the end token is not emitted


@pytest.mark.parametrize("model_id", LMS)
def test_chat_through_the_openai_sdk_equals_the_pipeline(user_mesh, user_folders, openai_client, model_id):
    assert model_id not in user_mesh.refused, user_mesh.refused.get(model_id)
    reply = openai_client.chat.completions.create(
        model=model_id, messages=MESSAGES, temperature=0, max_tokens=NEW_TOKENS
    )
    assert reply.choices[0].message.content == hf_chat(user_folders[model_id])
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("model_id", LMS)
def test_text_generation_through_inference_client_equals_the_pipeline(user_mesh, user_folders, hf_client, model_id):
    text = hf_client(model_id).text_generation(PROMPT, max_new_tokens=NEW_TOKENS)
    assert text == hf_completion(user_folders[model_id])


def test_completions_through_the_openai_sdk_equal_the_pipeline(user_mesh, user_folders, openai_client):
    model_id = "test/qwen2-chat"
    assert model_id not in user_mesh.refused, user_mesh.refused.get(model_id)
    reply = openai_client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=NEW_TOKENS)
    assert reply.choices[0].text == hf_completion(user_folders[model_id])

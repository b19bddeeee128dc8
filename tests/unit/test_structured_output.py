"""Structured output and tool calls without a mesh: the gateway's reading of `response_format`,
`tools` and `tool_choice`, its tool-call parser (whole and streamed), preprocess's tool-aware
rendering with tiny-llama-chat's template, and the scheduler's grammar mask on the tiny model
(every sampled output parses and validates)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from services.common.errors import MeshError
from services.gateway.api import structured

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TINY = "meshserve/tiny-llama-chat"


def test_response_format_kinds():
    assert structured.response_format_schema(None) is None
    assert structured.response_format_schema({"type": "text"}) is None
    assert json.loads(structured.response_format_schema({"type": "json_object"})) == {"type": "object"}
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    assert json.loads(structured.response_format_schema(rf)) == SCHEMA


@pytest.mark.parametrize(
    "rf",
    [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}},
        {"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}},
    ],
)
def test_bad_response_format_is_invalid_input_naming_it(rf):
    with pytest.raises(MeshError) as err:
        structured.response_format_schema(rf)
    assert err.value.param == "response_format"


def test_tool_plans():
    assert structured.tool_plan(None, None) == structured.ToolPlan()
    assert structured.tool_plan([WEATHER], "none") == structured.ToolPlan()
    auto = structured.tool_plan([WEATHER], None)
    assert auto.parses and auto.forced_schema is None and auto.names == ("get_weather",)
    forced = structured.tool_plan([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    schema = json.loads(forced.forced_schema)
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "other", "arguments": {"city": "Oslo"}}, schema)
    other = {"type": "function", "function": {"name": "other"}}
    required = json.loads(structured.tool_plan([WEATHER, other], "required").forced_schema)
    assert len(required["anyOf"]) == 2
    for tools, choice in (([WEATHER], {"type": "function", "function": {"name": "nope"}}), (None, "required")):
        with pytest.raises(MeshError) as err:
            structured.tool_plan(tools, choice)
        assert err.value.param == "tool_choice"
    with pytest.raises(MeshError) as err:
        structured.tool_plan([{"type": "function", "function": {"description": "no name"}}], None)
    assert err.value.param == "tools"


def test_parse_calls_forced_and_hermes():
    forced = structured.tool_plan([WEATHER], "required")
    content, calls = structured.parse_calls(forced, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    auto = structured.tool_plan([WEATHER], "auto")
    text = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = structured.parse_calls(auto, text)
    assert content == "Let me look." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert structured.parse_calls(auto, "just text") == ("just text", [])
    assert structured.finish_reason("stop", calls) == "tool_calls"
    assert structured.finish_reason("length", calls) == "length"


def _replay(plan, pieces):
    stream = structured.CallStream(plan)
    deltas = [d for p in pieces for d in stream.feed(p)] + stream.close()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            slot = calls.setdefault(call["index"], {"name": None, "arguments": "", "id": None})
            slot["id"] = slot["id"] or call.get("id")
            slot["name"] = slot["name"] or call.get("function", {}).get("name")
            slot["arguments"] += call["function"].get("arguments", "")
    return content, calls


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_forced_call_rebuilds_the_arguments(size):
    text = '{"name": "get_weather", "arguments": {"city": "New {York}"}}'
    content, calls = _replay(
        structured.tool_plan([WEATHER], "required"), [text[i : i + size] for i in range(0, len(text), size)]
    )
    assert content == ""
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "New {York}"}


@pytest.mark.parametrize("size", [1, 4, 100])
def test_streamed_hermes_calls_and_text(size):
    text = 'Sure<tool<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call> and <tool_call>{"name": "get_weather", "arguments": {"city": "B"}}</tool_call>!'
    content, calls = _replay(
        structured.tool_plan([WEATHER], "auto"), [text[i : i + size] for i in range(0, len(text), size)]
    )
    assert content == "Sure<tool and !"
    assert [json.loads(c["arguments"])["city"] for c in calls.values()] == ["A", "B"]


def test_tiny_template_renders_tools_the_hermes_way(models_dir):
    from transformers import AutoTokenizer

    from services.preprocess.tools import ToolChat, render, supports_tools

    tokenizer = AutoTokenizer.from_pretrained(str(models_dir / TINY / "model"))
    assert not supports_tools(tokenizer.chat_template)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [("user", "Weather in Oslo?"), ("assistant", ""), ("tool", "sunny")]
    chat = ToolChat([WEATHER], [None, [call], None], [None, None, "call_1"])
    text = render(tokenizer, messages, chat)
    assert text.startswith("<s><|system|>You are a function calling AI model.")
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert (
        '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|end|>' in text
    )
    assert "<|user|><tool_response>\nsunny\n</tool_response><|end|>" in text
    assert text.endswith("<|assistant|>")


@pytest.fixture(scope="module")
def tiny_runtime(models_dir):
    from services.inference.generation import CausalLMRuntime

    return CausalLMRuntime(models_dir / TINY / "model")


def _spec():
    from services.common.catalog import InferenceSpec, TensorSpec

    return InferenceSpec(
        name="tiny", runtime="causal_lm", max_batch_size=32,
        inputs=(TensorSpec(name="input_ids", datatype="INT64", dims=(-1,)),),
        outputs=(TensorSpec(name="token_id", datatype="INT64", dims=(1,)),),
    )  # fmt: skip


async def test_scheduler_mask_holds_every_sampled_output_to_the_schema(tiny_runtime, models_dir):
    from transformers import AutoTokenizer

    from services.inference.generation import GenerationScheduler, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(models_dir / TINY / "model"))
    prompt = tokenizer.encode("<s><|user|>Who are you?<|end|><|assistant|>", add_special_tokens=False)
    scheduler = GenerationScheduler("tiny", tiny_runtime, _spec())
    schema = json.dumps(SCHEMA)
    try:
        plain = scheduler.submit(prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1))
        streams = [
            scheduler.submit(prompt, SamplingParams(max_new_tokens=96, temperature=1.0, seed=i, json_schema=schema))
            for i in range(40)
        ]
        results = await asyncio.gather(*(_collect(s) for s in [plain, *streams]))
    finally:
        await scheduler.close()
    for ids, reason in results[1:]:
        assert reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)
    assert results[0][0]  # the unconstrained row in the same batch generated as usual


async def test_scheduler_refuses_a_schema_the_compiler_cannot_use(tiny_runtime):
    from services.inference.generation import GenerationScheduler, SamplingParams

    scheduler = GenerationScheduler("tiny", tiny_runtime, _spec())
    try:
        with pytest.raises(MeshError) as err:
            scheduler.submit([0, 5], SamplingParams(json_schema="{not json"))
    finally:
        await scheduler.close()
    assert err.value.param == "response_format"


async def _collect(stream):
    ids, reason = [], None
    async for event in stream:
        if event.final:
            reason = event.finish_reason
        elif event.token_id is not None:
            ids.append(event.token_id)
    return ids, reason

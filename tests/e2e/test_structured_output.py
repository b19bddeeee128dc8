"""Structured output and tools through every hop with real, unmodified clients: the openai SDK
(`response_format` json_object / json_schema, `chat.completions.parse` with a pydantic model,
tools with `tool_choice` auto / none / required / named, stream and not) and LangChain's
ChatOpenAI (`with_structured_output`, `bind_tools`), on both backends. The tiny model is sampled
at temperature 1.0: only the grammar mask makes its output parse."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field

pytestmark = pytest.mark.xdist_group("mesh")

LM = "meshserve/tiny-llama-chat"
ASK = [{"role": "user", "content": "Describe a person."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Berlin", "Tokyo"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "tags", "active"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    active: bool


@pytest.fixture
def client(mesh):
    return OpenAI(base_url=mesh.url + "/v1", api_key="unused", max_retries=0)


def test_200_sampled_json_schema_outputs_all_validate(mesh):
    async def run() -> list:
        aclient = AsyncOpenAI(base_url=mesh.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        limit = asyncio.Semaphore(32)
        rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}

        async def one(i: int):
            async with limit:
                return await aclient.chat.completions.create(
                    model=LM, messages=ASK, temperature=1.0, seed=i, max_tokens=200, response_format=rf
                )

        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await aclient.close()

    replies = asyncio.run(run())
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert len({r.choices[0].message.content for r in replies}) > 20  # sampled, not one answer


def test_json_object_chat_and_completions(mesh, client):
    # JSON mode bounds no string, so a sampled tiny model may run out of tokens inside one: every
    # output is a JSON object's prefix, and every one that ends by itself parses as an object.
    stopped = 0
    for seed in range(6):
        chunks = list(
            client.chat.completions.create(
                model=LM, messages=ASK, temperature=1.0, max_tokens=480, response_format={"type": "json_object"},
                seed=seed, stream=True,
            )
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("{")
        if chunks[-1].choices[0].finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(text), dict)
    assert stopped
    done = client.completions.create(
        model=LM, prompt="A JSON object:", temperature=0.7, max_tokens=300, seed=1,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
    )  # fmt: skip
    jsonschema.validate(json.loads(done.choices[0].text), SCHEMA)


def test_invalid_schema_is_a_400_naming_response_format(mesh, client):
    for rf in (
        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}},
        {"type": "yaml"},
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=LM, messages=ASK, response_format=rf)
        assert err.value.body["param"] == "response_format"


def test_openai_parse_with_a_pydantic_model(mesh, client):
    reply = client.chat.completions.parse(model=LM, messages=ASK, response_format=Person, temperature=1.0, seed=7)
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_langchain_with_structured_output(mesh):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=LM, base_url=mesh.url + "/v1", api_key="unused", temperature=1.0, max_retries=0)
    for method in ("json_schema", "function_calling"):
        person = chat.with_structured_output(Person, method=method).invoke("Describe a person.")
        assert isinstance(person, Person)


def _check_call(call, tool=WEATHER):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call(mesh, client, choice):
    reply = client.chat.completions.create(
        model=LM, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME] if choice != "required" else [WEATHER],
        tool_choice=choice, temperature=1.0, seed=5,
    )  # fmt: skip
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    _check_call(message.tool_calls[0])


def test_forced_tool_call_streams_id_and_name_then_arguments(mesh, client):
    chunks = list(
        client.chat.completions.create(
            model=LM, messages=[{"role": "user", "content": "Time?"}], tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=1.0, seed=2, stream=True,
        )
    )  # fmt: skip
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_time" and calls[0].function.arguments == ""
    assert all(tc.id is None and tc.function.name is None for tc in calls[1:]) and len(calls) > 1
    arguments = "".join(tc.function.arguments for tc in calls)
    jsonschema.validate(json.loads(arguments), TIME["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_and_none_answer_in_text_and_a_tool_turn_renders(mesh, client):
    for choice in ("auto", "none"):
        reply = client.chat.completions.create(
            model=LM, messages=[{"role": "user", "content": "Hello"}], tools=[WEATHER], tool_choice=choice,
            max_tokens=16, temperature=0,
        )  # fmt: skip
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    reply = client.chat.completions.create(model=LM, messages=history, tools=[WEATHER], max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices) is not None


def test_langchain_bind_tools(mesh):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=LM, base_url=mesh.url + "/v1", api_key="unused", temperature=1.0, max_retries=0)
    bound = chat.bind_tools([WEATHER], tool_choice="get_weather")
    message = bound.invoke("Weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(message.tool_calls[0]["args"], WEATHER["function"]["parameters"])
    streamed = None
    for chunk in bound.stream("Weather in Tokyo?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(streamed.tool_calls[0]["args"], WEATHER["function"]["parameters"])

"""Structured output and tool calls in the OpenAI dialect: what `response_format`, `tools` and
`tool_choice` ask of the generation, and how its text becomes `message.tool_calls`.

- `response_format` `json_object` is the schema `{"type": "object"}`; `json_schema` sends its
  `schema`. The inference service compiles the schema into a token mask (services/inference/
  constraints.py), so the output always parses and validates; a schema that is not a JSON schema
  is refused here, with `param: response_format`.
- `tools` are rendered into the prompt by preprocess with the model's chat template (the Hermes
  convention when the template knows no tools: services/preprocess/tools.py). `tool_choice`
  `required` or a named function forces one call through the same mask: the output is the JSON
  object `{"name": ..., "arguments": {...}}` of a schema built from the tools' parameters.
  `auto` (the default with tools) parses `<tool_call>{json}</tool_call>` blocks if the model
  writes them (the Hermes parser: Qwen2.5, Hermes, tiny-llama-chat); `none` renders no tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

import jsonschema

from services.common.errors import invalid
from services.gateway.api.sse import DONE, sse, usage

JSON_OBJECT = '{"type":"object"}'
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_OPEN = "<tool_call>"
# The forced call's head as the mask writes it: `{"name": "<name>", "arguments": ` (spaces free).
FORCED_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def response_format_schema(response_format: dict | None) -> str | None:
    """The JSON schema text `response_format` asks for, or None for plain text."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind != "json_schema":
        raise invalid(
            "`response_format.type` must be one of 'text', 'json_object', 'json_schema'", param="response_format"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise invalid("`response_format.json_schema` must be an object with a `name`", param="response_format")
    schema = spec.get("schema", {})
    return json.dumps(checked_schema(schema, "response_format.json_schema.schema"))


def checked_schema(schema, where: str) -> dict:
    """`schema` if it is a valid JSON schema (an object), else a 400 naming `where`'s root key."""
    param = where.split(".")[0]
    if not isinstance(schema, dict):
        raise invalid(f"`{where}` must be a JSON schema object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise invalid(f"`{where}` is not a valid JSON schema: {err.message}", param=param) from None
    return schema


@dataclass(frozen=True)
class ToolPlan:
    """What the request's tools ask: the tools to render (JSON text), the schema that forces a
    call (None: the model may answer in text), and whether to look for calls in the output."""

    tools_json: str | None = None
    forced_schema: str | None = None
    names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def parses(self) -> bool:
        return self.tools_json is not None


def tool_plan(tools: list | None, tool_choice) -> ToolPlan:
    """Validate `tools` and `tool_choice` (OpenAI's shapes) into a ToolPlan."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise invalid("`tool_choice` needs `tools`", param="tool_choice")
        return ToolPlan()
    functions = [_function(i, tool) for i, tool in enumerate(tools)]
    names = tuple(f["name"] for f in functions)
    if tool_choice == "none":
        return ToolPlan()
    rendered = json.dumps([{"type": "function", "function": f} for f in functions])
    if tool_choice in (None, "auto"):
        return ToolPlan(rendered, None, names)
    if tool_choice == "required":
        chosen = functions
    elif isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str):
        name = tool_choice["function"]["name"]
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise invalid(f"`tool_choice` names function {name!r}, which is not in `tools`", param="tool_choice")
    else:
        raise invalid(
            "`tool_choice` must be 'none', 'auto', 'required' or {type: function, function: {name}}",
            param="tool_choice",
        )
    return ToolPlan(rendered, json.dumps(_call_schema(chosen)), names)


def _function(i: int, tool) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise invalid(f"`{where}` must be {{type: function, function: {{name, parameters}}}}", param="tools")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise invalid(f"`{where}.function.name` is required", param="tools")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    checked_schema(parameters, f"tools.{i}.function.parameters")
    out = {"name": function["name"], "parameters": parameters}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


def _call_schema(functions: list[dict]) -> dict:
    """One call of one of `functions`: `{"name": <const>, "arguments": <its parameters>}`, name
    first (the mask writes properties in order, so a stream learns the name first)."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def parse_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(the message's content, its tool calls) from a whole generation's text."""
    if not plan.parses:
        return text, []
    if plan.forced_schema is not None:
        call = _call_of(text)
        return (None, [call]) if call else (text, [])
    calls = [c for c in (_call_of(m.group(1)) for m in TOOL_CALL.finditer(text)) if c]
    if not calls:
        return text, []
    content = TOOL_CALL.sub("", text).strip()
    return content or None, calls


def _call_of(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return tool_call(value["name"], arguments)


def finish_reason(reason: str | None, calls: list[dict]) -> str | None:
    """OpenAI's `tool_calls` when the message ends with calls (a cut-off output keeps `length`)."""
    return "tool_calls" if calls and reason == "stop" else reason


class CallStream:
    """Tool calls out of a token stream, as OpenAI streams them: a call's first delta carries its
    index, id, type and name (arguments ""), the next ones pieces of its arguments. Text that may
    still turn out to be part of a call is held back; everything else is content."""

    def __init__(self, plan: ToolPlan) -> None:
        self.forced = plan.forced_schema is not None
        self.buffer = ""
        self.calls = 0
        self.in_call = False  # forced: the head was read, the buffer holds arguments

    def feed(self, text: str) -> list[dict]:
        """The deltas `text` completes."""
        self.buffer += text
        return self._forced() if self.forced else self._auto()

    def close(self) -> list[dict]:
        """The deltas of what is left at the end of the generation."""
        rest, self.buffer = self.buffer, ""
        if self.forced and self.in_call:
            rest = rest.rstrip()
            return [self._args(rest[:-1] if rest.endswith("}") else rest)] if rest else []
        return [{"content": rest}] if rest else []

    def _forced(self) -> list[dict]:
        deltas = []
        if not self.in_call:
            head = FORCED_HEAD.match(self.buffer)
            if head is None:
                return []
            self.in_call, self.buffer = True, self.buffer[head.end() :]
            deltas.append(self._head(json.loads(f'"{head.group(1)}"')))
        # The outer object's closing brace (and spaces) may be at the end: hold them back.
        keep = len(self.buffer) - len(self.buffer.rstrip("} \t\n\r"))
        ready, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        if ready:
            deltas.append(self._args(ready))
        return deltas

    def _auto(self) -> list[dict]:
        deltas = []
        while True:
            if self.in_call:
                end = self.buffer.find("</tool_call>")
                if end < 0:
                    return deltas
                call = _call_of(self.buffer[:end].strip())
                self.buffer, self.in_call = self.buffer[end + len("</tool_call>") :], False
                if call is not None:
                    deltas += [self._head(call["function"]["name"]), self._args(call["function"]["arguments"])]
                continue
            start = self.buffer.find(TOOL_OPEN)
            if start >= 0:
                if start:
                    deltas.append({"content": self.buffer[:start]})
                self.buffer, self.in_call = self.buffer[start + len(TOOL_OPEN) :], True
                continue
            held = _partial_suffix(self.buffer, TOOL_OPEN)
            if len(self.buffer) > held:
                deltas.append({"content": self.buffer[: len(self.buffer) - held]})
                self.buffer = self.buffer[len(self.buffer) - held :]
            return deltas

    def _head(self, name: str) -> dict:
        self.calls += 1
        call = {
            "index": self.calls - 1,
            "id": call_id(),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        return {"tool_calls": [call]}

    def _args(self, piece: str) -> dict:
        return {"tool_calls": [{"index": self.calls - 1, "function": {"arguments": piece}}]}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that starts `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


async def tool_chat_events(steps, head: dict, include_usage: bool, plan: ToolPlan):
    """The chat stream of a request with tools (sse.chat_events' shape, deltas from CallStream)."""
    chunk = {**head, "object": "chat.completion.chunk"}

    def event(delta: dict, reason: str | None = None) -> bytes:
        return sse({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]})

    calls = CallStream(plan)
    yield event({"role": "assistant", "content": ""})
    async for step in steps:
        out = b"".join(event(d) for d in calls.feed(step.text)) if step.text else b""
        if step.final:
            out += b"".join(event(d) for d in calls.close())
            reason = "tool_calls" if calls.calls and step.finish_reason == "stop" else step.finish_reason
            tail = sse({**chunk, "choices": [], "usage": usage(step)}) if include_usage else b""
            yield out + event({}, reason) + tail + DONE
            return
        if out:
            yield out
    yield DONE


def with_tools(gen, plan: ToolPlan, messages) -> object:
    """The GenerationRequest `gen` with the plan's tools, its forcing schema, and the messages'
    tool calls and call ids (OpenAI's extra message fields)."""
    from dataclasses import replace

    extras = tuple(
        {k: v for k, v in (m.model_extra or {}).items() if k in ("tool_calls", "tool_call_id")} or None
        for m in messages
    )
    if plan.tools_json is None and not any(extras) and all(m.role != "tool" for m in messages):
        return gen
    schema = plan.forced_schema or gen.json_schema
    return replace(gen, tools_json=plan.tools_json, json_schema=schema, message_extras=extras)


def render_calls(plan: ToolPlan, choice: dict) -> None:
    """A non-streamed chat choice with its tool calls parsed out of its text (in place)."""
    if not plan.parses:
        return
    message = choice["message"]
    content, calls = parse_calls(plan, message["content"])
    message["content"] = content
    if calls:
        message["tool_calls"] = calls
        choice["finish_reason"] = finish_reason(choice["finish_reason"], calls)


def check_local(route, gen) -> None:
    """Structured output and tools run in the local mesh's scheduler; a remote provider's route
    would drop them silently, so such a request is refused instead (400 naming the field)."""
    if route.local_only:
        return
    if gen.json_schema or gen.tools_json:
        param = "tools" if gen.tools_json else "response_format"
        raise invalid(
            f"`{param}` is served by the local mesh only; this model routes to a remote provider", param=param
        )

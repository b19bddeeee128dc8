"""Chats with tools: OpenAI's `tools`, assistant `tool_calls` and `tool` turns rendered into a
prompt with the model's chat template.

A template that knows tools (it reads the `tools` variable: Qwen2.5, Hermes, Llama 3.1, Mistral)
gets them as transformers' `apply_chat_template(tools=...)` passes them, and the messages in
the shape those templates read (`tool_calls[].function.arguments` as an object). A template
that does not (tiny-llama-chat's: system, user and assistant turns only) gets the Hermes
convention written into the turns it has: the tools in a `<tools>` block of the system turn,
calls as `<tool_call>{json}</tool_call>` in the assistant's text, results as
`<tool_response>` in a user turn. Either way the gateway parses calls as Hermes writes them
(services/gateway/api/structured.py), unless the call was forced by a JSON-schema mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from services.common.errors import invalid

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Here are the available tools: <tools>\n{tools}\n</tools>\nFor each function call, return a "
    "json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolChat:
    """The tool parts of a chat request: the tools, and per message its calls and call id."""

    tools: list[dict] | None
    tool_calls: list[list[dict] | None]
    tool_call_ids: list[str | None]


def tool_chat(tools_json: str, messages) -> ToolChat | None:
    """The ToolChat of a PrepareGenerationRequest's fields, or None when nothing is about tools."""
    calls = [m.tool_calls_json for m in messages]
    ids = [m.tool_call_id for m in messages]
    if not tools_json and not any(calls) and not any(ids) and all(m.role != "tool" for m in messages):
        return None
    try:
        tools = json.loads(tools_json) if tools_json else None
        parsed = [json.loads(c) if c else None for c in calls]
    except ValueError as err:
        raise invalid(f"tools or tool calls are not JSON: {err}", param="tools") from None
    return ToolChat(tools, parsed, [i or None for i in ids])


def supports_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def render(tokenizer, messages: list[tuple[str, str]], chat: ToolChat) -> str:
    """The prompt of a chat with tools, an assistant turn opened."""
    if supports_tools(tokenizer.chat_template):
        turns = [_native(role, content, chat, i) for i, (role, content) in enumerate(messages)]
        return tokenizer.apply_chat_template(turns, tools=chat.tools, add_generation_prompt=True, tokenize=False)
    turns = [_hermes(role, content, chat, i) for i, (role, content) in enumerate(messages)]
    if chat.tools:
        block = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in chat.tools))
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{block}\n{turns[0]['content']}"}
        else:
            turns.insert(0, {"role": "system", "content": block})
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)


def _arguments(call: dict) -> tuple[str, object]:
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return str(function.get("name", "")), arguments


def _native(role: str, content: str, chat: ToolChat, i: int) -> dict:
    turn: dict = {"role": role, "content": content}
    if chat.tool_calls[i]:
        turn["tool_calls"] = [
            {
                "type": "function",
                "id": c.get("id"),
                "function": dict(zip(("name", "arguments"), _arguments(c), strict=True)),
            }
            for c in chat.tool_calls[i]
        ]
    if chat.tool_call_ids[i]:
        turn["tool_call_id"] = chat.tool_call_ids[i]
    return turn


def _hermes(role: str, content: str, chat: ToolChat, i: int) -> dict:
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    calls = chat.tool_calls[i] or []
    blocks = [
        "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"
        for name, args in map(_arguments, calls)
    ]
    return {"role": role, "content": "\n".join([content, *blocks]) if content else "\n".join(blocks)}

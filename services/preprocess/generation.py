"""Generation prompts: chat-template rendering, tokenization and the token limits.

The chat template is the model's own (Jinja, in its tokenizer_config.json), rendered by
transformers' `apply_chat_template`, so any Hugging Face chat model brings its template along.
Limits are checked, never silently applied: a prompt over `max_input_tokens`, or a request whose
prompt plus `max_new_tokens` exceeds `max_total_tokens`, is a validation error naming the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.catalog import ModelEntry
from services.common.errors import invalid
from services.preprocess.tools import ToolChat
from services.preprocess.tools import render as render_tools

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]
    max_new_tokens: int
    stop_token_ids: list[int]


class GenerationPreprocessor:
    """Tokenizer and limits of one causal LM."""

    def __init__(self, entry: ModelEntry, folder: Path) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        self.entry = entry
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        spec = entry.preprocess
        self.max_input = spec.max_input_tokens or spec.max_length
        self.max_total = spec.max_total_tokens or spec.max_length
        stop: set[int] = set()
        try:
            ids = GenerationConfig.from_pretrained(str(folder)).eos_token_id
            stop.update(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        except OSError:
            pass
        if self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        self.stop_token_ids = sorted(stop)

    def chat_ids(self, messages: list[tuple[str, str]], tools: ToolChat | None = None) -> list[int]:
        if not messages:
            raise invalid("`messages` must contain at least one message", param="messages")
        for i, (role, _) in enumerate(messages):
            if role not in ROLES and not (tools is not None and role == "tool"):
                raise invalid(f"`messages[{i}].role` must be one of {list(ROLES)}", param="messages")
        if self.tokenizer.chat_template is None:
            raise invalid(f"model {self.entry.id!r} has no chat template: use the completions API", param="messages")
        if tools is not None:  # tools, tool calls or tool results: services/preprocess/tools.py
            return self.tokenizer.encode(render_tools(self.tokenizer, messages, tools), add_special_tokens=False)
        rendered = self.tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def text_ids(self, text: str) -> list[int]:
        if not text:
            raise invalid("`prompt` must not be empty", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=True)

    def prompt(self, ids: list[int], max_new_tokens: int | None) -> Prompt:
        if len(ids) > self.max_input:
            raise invalid(
                f"the prompt has {len(ids)} tokens; model {self.entry.id!r} takes at most {self.max_input}",
                param="messages",
            )
        room = self.max_total - len(ids)
        if max_new_tokens is None:
            max_new_tokens = min(self.entry.preprocess.default_max_new_tokens, room)
        elif len(ids) + max_new_tokens > self.max_total:
            raise invalid(
                f"the prompt has {len(ids)} tokens and max_tokens is {max_new_tokens}: together more than the "
                f"{self.max_total} tokens model {self.entry.id!r} allows; ask for at most {room}",
                param="max_tokens",
            )
        if max_new_tokens < 1:
            raise invalid(f"the prompt leaves no room to generate within {self.max_total} tokens", param="messages")
        return Prompt(ids, max_new_tokens, self.stop_token_ids)

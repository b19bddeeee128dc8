"""vLLM's /tokenize and /detokenize for any text model of the catalog: a generation model's
tokenizer (transformers, with its chat template) or an encoder's (tokenizers, uncut, unpadded).
No token limit applies (vLLM's /tokenize reports `max_model_len` and lets the caller compare)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import ErrorCode, MeshError, invalid
from services.preprocess.core import Preprocessor, TextPreprocessor
from services.preprocess.generation import ROLES


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    max_model_len: int
    strs: list[str]


@dataclass(frozen=True)
class Chat:
    """A chat to tokenize and how its template is rendered."""

    messages: list[tuple[str, str]]
    add_generation_prompt: bool
    continue_final_message: bool


def tokenize(core: Preprocessor, model_id: str, text: str | Chat, add_special_tokens: bool) -> Tokens:
    """The text's (or the rendered chat's) token ids, with the tokenizer's special tokens when asked."""
    pre = core.tokenizer_of(model_id)
    chars = sum(len(c) for _, c in text.messages) if isinstance(text, Chat) else len(text)
    if chars > pre.entry.preprocess.max_chars:
        raise MeshError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"{chars} characters to tokenize; model {model_id!r} takes at most {pre.entry.preprocess.max_chars}",
            param="messages" if isinstance(text, Chat) else "prompt",
        )
    if isinstance(pre, TextPreprocessor):
        if isinstance(text, Chat):
            raise invalid(f"model {model_id!r} has no chat template: send `prompt`", param="messages")
        encoding = pre.plain.encode(text, add_special_tokens=add_special_tokens)
        return Tokens(list(encoding.ids), pre.limit, list(encoding.tokens))
    tokenizer = pre.tokenizer
    if isinstance(text, Chat):
        text = render_chat(pre, model_id, text)
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return Tokens(ids, pre.max_total, tokenizer.convert_ids_to_tokens(ids))


def render_chat(pre, model_id: str, chat: Chat) -> str:
    """The chat in the model's template (vLLM: generation prompt and final-message continuation
    exclude each other)."""
    if chat.add_generation_prompt and chat.continue_final_message:
        raise invalid(
            "`continue_final_message` and `add_generation_prompt` cannot both be true", param="continue_final_message"
        )
    if not chat.messages:
        raise invalid("`messages` must contain at least one message", param="messages")
    for i, (role, _) in enumerate(chat.messages):
        if role not in ROLES:
            raise invalid(f"`messages[{i}].role` must be one of {list(ROLES)}", param="messages")
    if pre.tokenizer.chat_template is None:
        raise invalid(f"model {model_id!r} has no chat template: send `prompt`", param="messages")
    return pre.tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in chat.messages],
        add_generation_prompt=chat.add_generation_prompt,
        continue_final_message=chat.continue_final_message,
        tokenize=False,
    )


def detokenize(core: Preprocessor, model_id: str, ids: list[int]) -> str:
    """The ids' text, special tokens kept (as vLLM's /detokenize); ids outside the vocabulary: 400."""
    pre = core.tokenizer_of(model_id)
    if isinstance(pre, TextPreprocessor):
        vocab = pre.plain.get_vocab_size(with_added_tokens=True)
    else:
        vocab = len(pre.tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside model {model_id!r}'s vocabulary (0 to {vocab - 1})", param="tokens")
    if isinstance(pre, TextPreprocessor):
        return pre.plain.decode(ids, skip_special_tokens=False)
    return pre.tokenizer.decode(ids, skip_special_tokens=False)

"""vLLM's tokenizer routes over the service layer: `POST /tokenize` ({model, prompt} or {model,
messages, add_generation_prompt, continue_final_message, add_special_tokens} -> {count,
max_model_len, tokens, token_strs}) and `POST /detokenize` ({model, tokens} -> {prompt}), for any
text model of the catalog (its own tokenizer; a chat with its template)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import invalid
from services.gateway.api.deps import services_of
from services.gateway.api.http_io import json_response, read_json
from services.gateway.service.validation import parse

router = APIRouter(tags=["vllm"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Body):
    type: str = Field(..., description="Only `text` parts.")
    text: str = ""


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class TokenizeRequest(_Body):
    """vLLM's TokenizeCompletionRequest or TokenizeChatRequest (one of `prompt`, `messages`)."""

    model: str = Field(..., description="Catalog model id (any text model).")
    prompt: str | None = Field(None, description="Text to tokenize.")
    messages: list[Message] | None = Field(None, description="A chat, rendered with the model's template.")
    add_special_tokens: bool | None = Field(
        None, description="Add BOS/[CLS]-style tokens (default: true for `prompt`, false for `messages`)."
    )
    add_generation_prompt: bool = Field(True, description="A chat: open an assistant turn (vLLM's default).")
    continue_final_message: bool = Field(False, description="A chat: leave the last message open.")
    return_token_strs: bool | None = Field(False, description="Also return each token as the vocabulary writes it.")


class DetokenizeRequest(_Body):
    model: str = Field(..., description="Catalog model id (any text model).")
    tokens: list[int] = Field(..., description="Token ids of the model's tokenizer.")


def _body(schema) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


def chat_of(messages: list[Message]) -> list[tuple[str, str]]:
    """(role, text) per message; a list content's text parts joined (other parts refused)."""
    chat = []
    for i, m in enumerate(messages):
        content = m.content or ""
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise invalid(f"`messages[{i}].content`: only text parts can be tokenized", param="messages")
            content = "".join(part.text for part in content)
        chat.append((m.role, content))
    return chat


@router.post("/tokenize", summary="Tokenize a text or a chat (vLLM)", openapi_extra=_body(TokenizeRequest))
async def tokenize(request: Request):
    body = parse(TokenizeRequest, await read_json(request, request.app.state.max_body_bytes))
    if (body.prompt is None) == (body.messages is None):
        raise invalid("send exactly one of `prompt` and `messages`", param="prompt")
    request.state.model = body.model
    chat = None if body.messages is None else chat_of(body.messages)
    special = body.add_special_tokens if body.add_special_tokens is not None else chat is None
    got = await services_of(request).tokenize.tokenize(
        body.model,
        prompt=body.prompt,
        messages=chat,
        add_special_tokens=special,
        add_generation_prompt=body.add_generation_prompt and chat is not None,
        continue_final_message=body.continue_final_message,
    )
    return json_response(
        {
            "count": len(got.tokens),
            "max_model_len": got.max_model_len,
            "tokens": got.tokens,
            "token_strs": got.token_strs if body.return_token_strs else None,
        }
    )


@router.post("/detokenize", summary="Token ids back to text (vLLM)", openapi_extra=_body(DetokenizeRequest))
async def detokenize(request: Request):
    body = parse(DetokenizeRequest, await read_json(request, request.app.state.max_body_bytes))
    request.state.model = body.model
    if any(not 0 <= t < 2**63 for t in body.tokens):
        raise invalid("`tokens` must be ids between 0 and 2**63 - 1", param="tokens")
    return json_response({"prompt": await services_of(request).tokenize.detokenize(body.model, body.tokens)})

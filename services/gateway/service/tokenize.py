"""Tokenization as callers see it (vLLM's /tokenize and /detokenize): any text model of the
catalog, by its own tokenizer in preprocess. Not metered (no model runs), as /v1/models."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.preprocess.v1 import preprocess_pb2
from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import Catalog
from services.common.errors import invalid
from services.gateway.pipeline.runner import Pipeline
from services.gateway.pipeline.tokenizer import TokenizerCalls


@dataclass(frozen=True)
class Tokenized:
    tokens: list[int]
    max_model_len: int
    token_strs: list[str]


class TokenizeService:
    def __init__(self, pipeline: Pipeline) -> None:
        self.catalog: Catalog = pipeline.catalog
        self.calls = TokenizerCalls(pipeline.preprocess)

    def _text_model(self, model_id: str) -> str:
        """The catalog id of a text model (404 for an unknown one, 400 for an image model)."""
        entry = self.catalog.get(model_id)
        if entry.preprocess.kind != "text":
            raise invalid(
                f"model {model_id!r} takes {entry.preprocess.kind} inputs: it has no tokenizer", param="model"
            )
        return entry.id

    async def tokenize(
        self,
        model_id: str,
        *,
        prompt: str | None = None,
        messages: list[tuple[str, str]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
    ) -> Tokenized:
        """A text's token ids, or a chat's rendered with the model's template."""
        request = preprocess_pb2.TokenizeRequest(
            model_id=self._text_model(model_id),
            add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        if messages is not None:
            request.messages.messages.extend(tasks_pb2.ChatMessage(role=r, content=c) for r, c in messages)
        else:
            request.text = prompt or ""
        reply = await self.calls.tokenize(request)
        return Tokenized(list(reply.tokens), reply.max_model_len, list(reply.token_strs))

    async def detokenize(self, model_id: str, tokens: list[int]) -> str:
        reply = await self.calls.detokenize(
            preprocess_pb2.DetokenizeRequest(model_id=self._text_model(model_id), tokens=tokens)
        )
        return reply.prompt

"""Embeddings (OpenAI `/v1/embeddings`, HF feature-extraction, TEI `/embed`): texts to vectors,
merged with concurrent requests by the coalescer when one runs, else one pipeline call; token ids
of the model's own tokenizer (OpenAI's token-id input as vLLM reads it) in one pipeline call."""

from __future__ import annotations

from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import ModelEntry
from services.gateway.control.metering import Metering
from services.gateway.pipeline.coalescer import Embedded, RequestCoalescer
from services.gateway.pipeline.runner import Pipeline, TokenEmbeddings
from services.gateway.service.bounds import text_token_bound
from services.gateway.service.context import CallContext


class EmbedService:
    def __init__(self, pipeline: Pipeline, metering: Metering, coalescer: RequestCoalescer | None = None) -> None:
        self.pipeline = pipeline
        self.metering = metering
        self.coalescer = coalescer

    async def vectors(
        self,
        model_id: str,
        texts,
        parameters: tasks_pb2.TaskParameters,
        *,
        inputs: tasks_pb2.TaskInputs | None = None,
        wait: bool = False,
    ) -> Embedded:
        """The texts' vectors and input tokens (not metered: the caller's use case meters). The
        coalescer does not wait for a cold model, so `wait` runs alone; `inputs`: the texts as
        TaskInputs when the caller has them already."""
        if self.coalescer is not None and not wait:
            return await self.coalescer.embed(model_id, list(texts), parameters)
        if inputs is None:
            inputs = tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=texts))
        prediction = await self.pipeline.predict(
            model_id, "feature-extraction", inputs, parameters, wait_for_model=wait
        )
        return Embedded.of(prediction)

    async def embeddings(
        self,
        ctx: CallContext,
        entry: ModelEntry,
        texts: list[str],
        *,
        dimensions: int | None = None,
        prompt_name: str | None = None,
        truncate: bool = False,
        normalize: bool | None = None,
    ) -> tuple[Embedded, dict]:
        """OpenAI (and TEI) embeddings: admitted, embedded (over-long texts refused, or cut with
        `truncate`; the first `dimensions` kept, the model's prompt `prompt_name` before each text,
        `normalize`: None for the model's setting), settled; returns the vectors and usage headers."""
        metering = self.metering
        metered = await self._admit(ctx, entry, text_token_bound(entry, texts, prompt_name))
        async with metering.track(metered):
            # OpenAI refuses over-long input rather than cutting it (`truncate`: the caller chose to cut).
            parameters = tasks_pb2.TaskParameters(
                truncate=truncate, dimensions=dimensions, prompt_name=prompt_name, normalize=normalize
            )
            result = await self.vectors(entry.id, texts, parameters)
            metered.add(input_tokens=result.input_tokens, items=len(texts), compute_s=result.compute_s)
        return result, metered.headers()

    async def token_embeddings(
        self,
        ctx: CallContext,
        entry: ModelEntry,
        items: list[list[int]],
        *,
        dimensions: int | None = None,
        normalize: bool | None = None,
    ) -> tuple[Embedded, dict]:
        """OpenAI embeddings of token-id input, read as the model's own tokenizer's ids (vLLM's
        reading): admitted at their exact count, embedded as they are (preprocess refuses ids out of
        the vocabulary or over the token limit), settled; returns the vectors and usage headers."""
        metered = await self._admit(ctx, entry, sum(len(ids) for ids in items))
        async with self.metering.track(metered):
            inputs = tasks_pb2.TaskInputs(
                token_ids=tasks_pb2.TokenIdInputs(items=[tasks_pb2.TokenIds(ids=ids) for ids in items])
            )
            parameters = tasks_pb2.TaskParameters(truncate=False, dimensions=dimensions, normalize=normalize)
            prediction = await self.pipeline.predict(entry.id, "feature-extraction", inputs, parameters)
            result = Embedded.of(prediction)
            metered.add(input_tokens=result.input_tokens, items=len(items), compute_s=result.compute_s)
        return result, metered.headers()

    async def embed_all(
        self,
        ctx: CallContext,
        entry: ModelEntry,
        inputs: tasks_pb2.TaskInputs,
        *,
        max_input_tokens: int,
        truncate: bool = False,
        prompt_name: str | None = None,
    ) -> tuple[TokenEmbeddings, dict]:
        """TEI's /embed_all: each input's token embeddings (texts, or the model's own token ids),
        admitted at `max_input_tokens`, settled at the tokens embedded; returns them and the usage
        headers. Not coalesced: the pooled path's batches stay as they are."""
        metered = await self._admit(ctx, entry, max_input_tokens)
        async with self.metering.track(metered):
            parameters = tasks_pb2.TaskParameters(truncate=truncate, prompt_name=prompt_name)
            result = await self.pipeline.token_embeddings(entry.id, inputs, parameters)
            items = len(result.vectors)
            metered.add(input_tokens=result.usage.input_tokens, items=items, compute_s=result.compute_s)
        return result, metered.headers()

    async def _admit(self, ctx: CallContext, entry: ModelEntry, max_input_tokens: int):
        """Admit a feature-extraction call of the caller (key, limits, the budget hold)."""
        return await self.metering.admit(
            ctx.principal,
            entry,
            "feature-extraction",
            ctx.route,
            ctx.request_id,
            max_input_tokens=max_input_tokens,
            client_request_id=ctx.client_request_id,
        )

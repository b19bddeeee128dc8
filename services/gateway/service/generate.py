"""Text generation (OpenAI chat and completions, the TGI dialect, gRPC Generate): admission
first, then the prompt, then the token stream, settled however it ends.

Admission (the key's restrictions, rate limits, a budget hold sized from the request's declared
bounds: the prompt's UTF-8 bytes or the model's prompt limit, max_tokens or the model's default)
comes before the prompt's length cap and before preprocess renders and tokenizes it; the model's
token limits are checked by preprocess on the real counts, and settlement charges those.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from services.common.catalog import GENERATION_TASKS, ModelEntry
from services.common.errors import ErrorCode, MeshError
from services.gateway.control.metering import Metered, Metering
from services.gateway.pipeline.generation import GenerationRequest, Generator, Prepared, SamplingExtras, Step
from services.gateway.pipeline.runner import Pipeline
from services.gateway.service.context import CallContext

__all__ = ["Collected", "GenerateService", "Generation", "GenerationRequest", "SamplingExtras", "Step"]


@dataclass(frozen=True)
class Collected:
    """A whole generation: its text, the final step, and every token's step (of choice 0), and
    with n > 1 every choice's own Collected, in index order (`choices[0]` is this one's fields).
    `completion_tokens` counts all of them."""

    text: str
    last: Step
    tokens: list[Step]
    choices: tuple[Collected, ...] = ()

    @property
    def completion_tokens(self) -> int:
        return sum(c.last.completion_tokens for c in self.choices) if self.choices else self.last.completion_tokens


class Generation:
    """One admitted generation whose prompt is tokenized: stream its steps inside `settled()`."""

    __slots__ = ("abandon", "entry", "metered", "metering", "prepared", "request", "stream_of")

    def __init__(
        self, entry, request, prepared: Prepared, metered: Metered, metering: Metering, stream_of, abandon=None
    ) -> None:
        self.entry = entry
        self.request = request
        self.prepared = prepared
        self.metered = metered
        self.metering = metering
        self.stream_of = stream_of
        self.abandon = abandon  # closes what the generation already opened (a routed stream's upstream)

    async def aclose(self) -> None:
        """Settle a generation whose steps were never taken (the client left before the response
        body started): what it opened is closed and the request finishes as abandoned (499), its
        budget hold settled and its ledger row written. A no-op once settled; idempotent."""
        if self.metered.finished:
            return
        try:
            if self.abandon is not None:
                await self.abandon()
        finally:
            await self.metering.track(self.metered).fail(asyncio.CancelledError())

    def settled(self):
        """`async with generation.settled():` settles the request with the status the block ended in."""
        return self.metering.track(self.metered)

    async def steps(self) -> AsyncIterator[Step]:
        """The generator's steps, recording completion tokens and time on the metered request (the
        time however the generation ends: a closed or failed stream pays for what it ran)."""
        metered = self.metered
        started = time.perf_counter()
        try:
            async with aclosing(self.stream_of(self.entry, self.prepared, self.request)) as stream:
                async for step in stream:
                    if not step.final:
                        metered.add(output_tokens=1)
                    yield step
        finally:
            metered.compute_s = time.perf_counter() - started

    async def collect(self) -> Collected:
        """Run to the end and settle (a non-streaming answer)."""
        texts, lasts, tokens = {0: ""}, {}, {0: []}
        async with self.settled(), aclosing(self.steps()) as steps:
            async for step in steps:
                i = step.index
                texts[i] = texts.get(i, "") + step.text
                if step.final:
                    lasts[i] = step
                else:
                    tokens.setdefault(i, []).append(step)
        if len(lasts) <= 1:
            return Collected(texts[0], lasts.get(0), tokens[0])
        choices = tuple(Collected(texts[i], lasts[i], tokens.get(i, [])) for i in sorted(lasts))
        return Collected(texts[0], lasts[0], tokens[0], choices)


class GenerateService:
    def __init__(self, pipeline: Pipeline, metering: Metering) -> None:
        self.catalog = pipeline.catalog
        self.generator = Generator(pipeline.preprocess, pipeline.inference, pipeline.postprocess)
        self.metering = metering

    def entry(self, model_id: str, *, param: str = "model", list_tasks: bool = True) -> ModelEntry:
        """The catalog model, refused with UNSUPPORTED_TASK if it does not generate text (the
        message lists its tasks unless `list_tasks` is false)."""
        entry = self.catalog.get(model_id)
        if not GENERATION_TASKS & set(entry.tasks):
            serves = f"; it serves: {', '.join(entry.tasks)}" if list_tasks else ""
            raise MeshError(
                ErrorCode.UNSUPPORTED_TASK, f"Model {entry.id!r} does not generate text{serves}", param=param
            )
        return entry

    async def start(self, ctx: CallContext, entry: ModelEntry, request: GenerationRequest) -> Generation:
        """Admit (key, limits, the budget hold), then check the prompt's length and tokenize it; a
        refusal after admission finishes the metered request with its status (no cost)."""
        max_input, max_output = request.token_bounds(entry)
        metering = self.metering
        metered = await metering.admit(
            ctx.principal,
            entry,
            "text-generation",
            ctx.route,
            ctx.request_id,
            max_input_tokens=max_input,
            max_output_tokens=max_output,
            tokens_hint=request.tokens_estimate(entry),
            client_request_id=ctx.client_request_id,
        )
        try:
            request.check_length(entry)
            prepared = await self.generator.prepare(entry, request)
        except BaseException as err:
            await metering.track(metered).fail(err)
            raise
        metered.add(input_tokens=prepared.prompt_tokens, items=1)
        return Generation(entry, request, prepared, metered, metering, self.generator.stream)

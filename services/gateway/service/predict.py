"""Task predictions (the HF task API, gRPC Predict): admit the request (the key's model and task
restrictions, limits, budget), answer it from the response cache or run the pipeline (row-wise
text and image tasks merged with concurrent requests by the coalescer), and settle its usage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import ModelEntry
from services.gateway.control.metering import Metered, Metering
from services.gateway.pipeline.cache import ResponseCache, cache_key
from services.gateway.pipeline.coalescer import RequestCoalescer, items_of
from services.gateway.pipeline.runner import Pipeline, Prediction
from services.gateway.service.bounds import token_bound
from services.gateway.service.context import CallContext
from services.gateway.service.embed import EmbedService


@dataclass(slots=True)
class Answer:
    """A task's answer: the rendered body, how the cache answered (HIT, MISS or BYPASS), and the
    usage and rate-limit headers."""

    content: bytes
    cache: str
    headers: dict[str, str]


def _items(inputs: tasks_pb2.TaskInputs) -> int:
    """Items a request carries (the ledger's count): its texts or images, else one."""
    kind = inputs.WhichOneof("kind")
    if kind == "text":
        return len(inputs.text.texts)
    if kind == "images":
        return len(inputs.images.images)
    if kind == "text_pairs":
        return len(inputs.text_pairs.pairs)
    if kind == "text_ranking":
        return len(inputs.text_ranking.documents)
    if kind == "question_answering":
        return len(inputs.question_answering.items)
    return 1


class PredictService:
    def __init__(
        self,
        pipeline: Pipeline,
        metering: Metering,
        cache: ResponseCache,
        embed: EmbedService,
        coalescer: RequestCoalescer | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.metering = metering
        self.cache = cache
        self.embed = embed
        self.coalescer = coalescer

    async def _admit(self, ctx: CallContext, entry: ModelEntry, task: str, inputs, parameters) -> Metered:
        """Admit one task request, its token bound computed from its inputs (inputs over a cap are refused)."""
        return await self.metering.admit(
            ctx.principal,
            entry,
            task,
            ctx.route,
            ctx.request_id,
            max_input_tokens=token_bound(entry, inputs, parameters),
            client_request_id=ctx.client_request_id,
        )

    async def answer(
        self,
        ctx: CallContext,
        entry: ModelEntry,
        task: str,
        inputs: tasks_pb2.TaskInputs,
        parameters: tasks_pb2.TaskParameters,
        render: Callable[[object], bytes],
        *,
        variant: str = "",
        use_cache: bool = True,
        wait: bool = False,
    ) -> Answer:
        """One HF task request. `render(result)` makes the body from the vectors of a
        feature-extraction, else the TaskResult; `variant` names the rendering in the cache key
        (a client's dialect); `wait`: wait for a cold model rather than refuse it."""
        metering = self.metering
        metered = await self._admit(ctx, entry, task, inputs, parameters)
        async with metering.track(metered):
            cache = self.cache
            scope = cache.scope_of(metered.principal.key_id)  # a key never sees another's entries
            key = cache_key(entry.id, task, inputs, parameters, variant, scope)
            content = cache.get(entry.id, key) if use_cache else None
            if content is not None:
                state = "HIT"
            else:
                state = "MISS" if use_cache else "BYPASS"
                content = render(await self._run(entry, task, inputs, parameters, wait, metered))
                cache.put(key, content)
        return Answer(content, state, metered.headers())

    async def _run(self, entry: ModelEntry, task: str, inputs, parameters, wait: bool, metered: Metered):
        """The task's result (vectors for feature-extraction), its usage recorded on `metered`."""
        items = _items(inputs)
        if task == "feature-extraction":
            embedded = await self.embed.vectors(entry.id, inputs.text.texts, parameters, inputs=inputs, wait=wait)
            metered.add(input_tokens=embedded.input_tokens, items=items, compute_s=embedded.compute_s)
            return embedded.vectors
        rows = items_of(task, inputs) if self.coalescer is not None and not wait else None  # None: not merged
        if rows is not None:
            share = await self.coalescer.run(entry.id, task, rows, parameters)
            metered.add(input_tokens=share.input_tokens, items=items, compute_s=share.compute_s)
            return tasks_pb2.TaskResult(classifications=tasks_pb2.Classifications(items=share.items))
        prediction = await self.pipeline.predict(entry.id, task, inputs, parameters, wait_for_model=wait)
        metered.add(input_tokens=prediction.usage.input_tokens, items=items, compute_s=prediction.compute_s)
        return prediction.result

    async def predict(
        self,
        ctx: CallContext,
        model_id: str,
        task: str | None,
        inputs: tasks_pb2.TaskInputs,
        parameters: tasks_pb2.TaskParameters,
    ) -> tuple[Prediction, dict[str, str]]:
        """One typed prediction (gRPC Predict), never cached nor merged; returns it and the usage
        and rate-limit headers."""
        entry, task = self.pipeline.resolve(model_id, task)
        metering = self.metering
        metered = await self._admit(ctx, entry, task, inputs, parameters)
        async with metering.track(metered):
            prediction = await self.pipeline.predict(entry.id, task, inputs, parameters)
            usage = prediction.usage
            metered.add(input_tokens=usage.input_tokens, items=usage.items, compute_s=prediction.compute_s)
        return prediction, metered.headers()

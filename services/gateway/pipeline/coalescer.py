"""Request coalescing for row-wise tasks (feature-extraction, text-classification on texts,
image-classification on images): concurrent requests for the same model, task and parameters share
one pipeline call (one preprocess, inference and postprocess RPC for the group).

With one sentence or image per request, the per-request cost of three gRPC hops is larger than the
model's share of a batch; merging requests at the gateway amortizes the hops the way the inference
service's dynamic batcher amortizes the model. No delay is added: a group is formed from what is
waiting when a slot frees (at most `max_in_flight` groups per key run at once, so stages overlap),
so an idle gateway sends each request alone and a busy one sends groups of up to `max_rows` items
(and at most the model's `max_items` per request; images also at most GROUP_IMAGE_BYTES in all).

Semantics stay per request: each caller gets its own rows and its own token count; when a group
fails on a caller's mistake (one bad text, one corrupt image), every member is retried alone, so only the offender
gets the error. A group runs in the context of its first member (deadline, trace); the other
members' traces get a `coalesced` span linked to it.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from meshserve.tasks.v1 import tasks_pb2
from opentelemetry import trace
from prometheus_client import Histogram

from services.common import deadlines
from services.common.errors import MeshError
from services.gateway.pipeline.runner import Pipeline

GROUP_ROWS = Histogram(
    "meshserve_gateway_coalesced_rows", "Items per coalesced pipeline call.", buckets=(1, 2, 4, 8, 16, 32, 64)
)
# Encoded image bytes in one merged call, and the most one request may carry to be merged: big
# uploads go alone (one gRPC message stays small, and a group's pixels stay under preprocess's cap).
GROUP_IMAGE_BYTES = 1 << 20
ALONE_IMAGE_BYTES = 256 * 1024
_tracer = trace.get_tracer("meshserve.gateway")


@dataclass(frozen=True)
class Embedded:
    """One caller's share of a group: its vectors [n, dim] and its input tokens."""

    vectors: np.ndarray
    input_tokens: int
    compute_s: float = 0.0

    @classmethod
    def of(cls, prediction) -> Embedded:
        """The vectors and token count of a feature-extraction Prediction."""
        tensor = prediction.result.embeddings
        vectors = np.frombuffer(tensor.raw, dtype="<f4").reshape(tuple(tensor.shape))
        return cls(vectors, prediction.usage.input_tokens, prediction.compute_s)


@dataclass(frozen=True)
class Classified:
    """One caller's share of a text-classification group: its label lists and input tokens."""

    items: list[tasks_pb2.ClassificationList]
    input_tokens: int
    compute_s: float = 0.0


def _share(task: str, prediction, start: int, n: int):
    """Rows [start, start + n) of a group's result, as the caller's own result."""
    usage = prediction.usage
    tokens = sum(usage.item_input_tokens[start : start + n])
    rows = len(usage.item_input_tokens) or usage.items or n
    compute_s = prediction.compute_s * n / rows  # a shared call's inference time, split by rows
    if task == "feature-extraction":
        return Embedded(Embedded.of(prediction).vectors[start : start + n], tokens, compute_s)
    return Classified(list(prediction.result.classifications.items[start : start + n]), tokens, compute_s)


# Tasks whose result has one independent row per input text (or image), so requests can be merged.
COALESCED_TASKS = ("feature-extraction", "text-classification")
IMAGE_COALESCED_TASKS = ("image-classification",)


def items_of(task: str, inputs: tasks_pb2.TaskInputs) -> list[str] | list[bytes] | None:
    """The rows a request adds to a group (its texts or images), or None when its task or its
    inputs' kind (text pairs, say) is not merged."""
    kind = inputs.WhichOneof("kind")
    if kind == "text" and task in COALESCED_TASKS:
        return list(inputs.text.texts)
    if kind == "images" and task in IMAGE_COALESCED_TASKS:
        return list(inputs.images.images)
    return None


def _inputs(task: str, items: list) -> tasks_pb2.TaskInputs:
    if task in IMAGE_COALESCED_TASKS:
        return tasks_pb2.TaskInputs(images=tasks_pb2.ImageInputs(images=items))
    return tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=items))


@dataclass(eq=False, slots=True)
class _Member:
    texts: list  # the caller's rows: texts (str) or encoded images (bytes)
    future: asyncio.Future
    context: contextvars.Context
    span_context: trace.SpanContext
    size: int = 0  # encoded bytes (images), 0 for texts


@dataclass
class _Lane:
    """Waiting members and running groups of one (model, task, parameters) key; `max_rows`: the
    most rows of one group (the coalescer's, at most the model's items per request)."""

    max_rows: int
    waiting: deque[_Member] = field(default_factory=deque)
    running: int = 0


class RequestCoalescer:
    def __init__(self, pipeline: Pipeline, *, timeout_s: float, max_rows: int = 32, max_in_flight: int = 3) -> None:
        self.pipeline = pipeline
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        self._lanes: dict[tuple[str, bytes], _Lane] = {}

    async def embed(self, model_id: str, texts: list[str], parameters: tasks_pb2.TaskParameters) -> Embedded:
        return await self.run(model_id, "feature-extraction", texts, parameters)

    async def run(self, model_id: str, task: str, texts: list, parameters: tasks_pb2.TaskParameters):
        """This caller's rows of a (possibly shared) pipeline call: Embedded or Classified.
        `texts`: the request's texts, or its encoded images for an image task (see items_of)."""
        key = (model_id, task, parameters.SerializeToString(deterministic=True))
        lane = self._lanes.get(key) or self._lane(key)
        size = sum(len(t) for t in texts) if task in IMAGE_COALESCED_TASKS else 0
        if len(texts) >= lane.max_rows or size > ALONE_IMAGE_BYTES:
            return await self._alone(model_id, task, texts, parameters)
        member = _Member(
            texts,
            asyncio.get_running_loop().create_future(),
            contextvars.copy_context(),
            trace.get_current_span().get_span_context(),
            size,
        )
        lane.waiting.append(member)
        if lane.running < self.max_in_flight:
            lane.running += 1
            asyncio.get_running_loop().create_task(self._drain(key, lane, parameters))
        return await member.future

    def _lane(self, key: tuple[str, str, bytes]) -> _Lane:
        entry, _ = self.pipeline.resolve(key[0], key[1])
        lane = self._lanes[key] = _Lane(max(1, min(self.max_rows, entry.preprocess.max_items)))
        return lane

    async def _alone(self, model_id: str, task: str, texts: list, parameters: tasks_pb2.TaskParameters):
        prediction = await self.pipeline.predict(model_id, task, _inputs(task, texts), parameters)
        return _share(task, prediction, 0, len(texts))

    @staticmethod
    def _take(lane: _Lane) -> list[_Member]:
        group, rows, size = [], 0, 0
        waiting = lane.waiting
        while waiting:
            head = waiting[0]
            if group and (rows + len(head.texts) > lane.max_rows or size + head.size > GROUP_IMAGE_BYTES):
                break
            waiting.popleft()
            if head.future.done():  # the caller went away
                continue
            group.append(head)
            rows += len(head.texts)
            size += head.size
        return group

    async def _drain(self, key: tuple[str, str, bytes], lane: _Lane, parameters: tasks_pb2.TaskParameters) -> None:
        try:
            while lane.waiting:
                await asyncio.sleep(0)  # let requests that arrived in the same loop turn join
                group = self._take(lane)
                if group:
                    # Each group runs in its first member's context: its deadline and its trace.
                    run = self._run(key[0], key[1], group, parameters)
                    await asyncio.create_task(run, context=group[0].context.copy())
        finally:
            lane.running -= 1

    async def _run(self, model_id: str, task: str, group: list[_Member], parameters: tasks_pb2.TaskParameters) -> None:
        token = deadlines.set_absolute(time.monotonic() + self.timeout_s)
        try:
            texts = [t for m in group for t in m.texts]
            GROUP_ROWS.observe(len(texts))
            try:
                prediction = await self.pipeline.predict(model_id, task, _inputs(task, texts), parameters)
            except MeshError as err:
                if len(group) > 1 and not err.code.server_fault:
                    await asyncio.gather(*(self._retry_alone(model_id, task, m, parameters) for m in group))
                else:
                    for m in group:
                        if not m.future.done():
                            m.future.set_exception(err)
                return
            except Exception as exc:  # keep every caller answered, whatever happened
                for m in group:
                    if not m.future.done():
                        m.future.set_exception(exc)
                return
            self._deliver(task, group, prediction)
        finally:
            deadlines.reset(token)

    def _deliver(self, task: str, group: list[_Member], prediction) -> None:
        leader = trace.get_current_span().get_span_context()
        row = 0
        for m in group:
            n = len(m.texts)
            if not m.future.done():
                m.future.set_result(_share(task, prediction, row, n))
            if m is not group[0] and m.span_context.is_valid:
                links = [trace.Link(leader)] if leader.is_valid else []
                ctx = trace.set_span_in_context(trace.NonRecordingSpan(m.span_context))
                _tracer.start_span("coalesced", context=ctx, links=links, attributes={"group_size": len(group)}).end()
            row += n

    async def _retry_alone(
        self, model_id: str, task: str, member: _Member, parameters: tasks_pb2.TaskParameters
    ) -> None:
        alone = asyncio.create_task(
            self._alone(model_id, task, member.texts, parameters), context=member.context.copy()
        )
        try:
            result = await alone
        except Exception as exc:
            if not member.future.done():
                member.future.set_exception(exc)
            return
        if not member.future.done():
            member.future.set_result(result)

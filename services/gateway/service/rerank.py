"""Reranking (TEI's `/rerank`, the Cohere/Jina `/v1/rerank`): a query scored against documents
by a text-ranking model, admitted, run and settled through PredictService like any task."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.gateway.service.context import CallContext
from services.gateway.service.predict import PredictService

TASK = "text-ranking"


@dataclass(frozen=True)
class Ranked:
    """Documents by descending score: (index in the request, score); the input tokens read."""

    model_id: str
    results: list[tuple[int, float]]
    input_tokens: int
    headers: dict[str, str]


def ranking_model(predict: PredictService, model_id: str | None, *, param: str = "model") -> ModelEntry:
    """The named model (it must serve text-ranking), else the only text-ranking model."""
    catalog = predict.pipeline.catalog
    if model_id:
        entry = catalog.get(model_id)
        catalog.resolve_task(entry, TASK)
        return entry
    rankers = [e for e in catalog.models if TASK in e.tasks]
    if len(rankers) == 1:
        return rankers[0]
    if not rankers:
        raise MeshError(ErrorCode.UNSUPPORTED_TASK, "no model here serves text-ranking", param=param)
    names = ", ".join(e.id for e in rankers)
    raise invalid(f"`{param}` is required: several models serve text-ranking ({names})", param=param)


def sorted_scores(scores, top_n: int | None = None) -> list[tuple[int, float]]:
    """(index, score) by descending score, ties in document order; the first top_n."""
    ranked = sorted(enumerate(float(s) for s in scores), key=lambda pair: -pair[1])
    return ranked[:top_n] if top_n else ranked


async def rerank(
    predict: PredictService,
    ctx: CallContext,
    entry: ModelEntry,
    query: str,
    documents: list[str],
    *,
    raw_scores: bool,
    truncate: bool,
    top_n: int | None = None,
) -> Ranked:
    """Scores every (query, document) pair; the caps are checked at admission (bounds.token_bound)."""
    inputs = tasks_pb2.TaskInputs(text_ranking=tasks_pb2.TextRankingInputs(query=query, documents=documents))
    parameters = tasks_pb2.TaskParameters(raw_scores=raw_scores, truncate=truncate)
    prediction, headers = await predict.predict(ctx, entry.id, TASK, inputs, parameters)
    results = sorted_scores(prediction.result.similarities.scores, top_n)
    return Ranked(entry.id, results, prediction.usage.input_tokens, headers)

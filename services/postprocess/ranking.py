"""text-ranking results: one relevance score per document, in document order (the gateway sorts
for the rerank APIs). Scores are the sigmoid of a cross-encoder's single logit, as
sentence-transformers' CrossEncoder.predict and TEI's /rerank give them; `raw_scores` keeps the logit."""

from __future__ import annotations

import numpy as np
from meshserve.postprocess.v1 import postprocess_pb2
from meshserve.tasks.v1 import tasks_pb2

from services.common.errors import ErrorCode, MeshError
from services.postprocess.core import Postprocessor, sigmoid


def relevance(logits: np.ndarray, *, raw: bool) -> np.ndarray:
    """[n, 1] logits -> [n] scores (sigmoid unless `raw`)."""
    column = logits[:, 0].astype(np.float64)
    return column if raw else sigmoid(column)


def text_ranking(
    core: Postprocessor,
    request: postprocess_pb2.PostprocessRequest,
    outputs: dict[str, np.ndarray],
    side: dict[str, np.ndarray],
) -> tasks_pb2.TaskResult:
    entry = core.catalog.get(request.model_id)
    name = entry.inference.outputs[0].name
    logits = outputs.get(name)
    if logits is None or logits.ndim != 2 or logits.shape[1] != 1:
        raise MeshError(
            ErrorCode.INVALID_INPUT,
            f"model outputs do not match text-ranking on {request.model_id!r}: expected [n, 1] '{name}'",
        )
    params = request.parameters
    scores = relevance(logits, raw=params.HasField("raw_scores") and params.raw_scores)
    return tasks_pb2.TaskResult(similarities=tasks_pb2.Similarities(scores=scores.tolist()))

"""gRPC PostprocessService over the transport-neutral Postprocessor."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from meshserve.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from services.common.errors import invalid
from services.common.tasks import task_from_pb
from services.common.tensors import from_pb, to_pb
from services.postprocess.core import Labelled, Postprocessor
from services.postprocess.detokenize import Detokenizers
from services.postprocess.fill_mask import fill_mask
from services.postprocess.question_answering import question_answering
from services.postprocess.ranking import text_ranking
from services.postprocess.token_classification import token_classification

ACTIVATION_OF = {
    tasks_pb2.FUNCTION_TO_APPLY_SOFTMAX: "softmax",
    tasks_pb2.FUNCTION_TO_APPLY_SIGMOID: "sigmoid",
    tasks_pb2.FUNCTION_TO_APPLY_NONE: "none",
}

# Tasks with a result builder of their own (one module each):
# (core, request, outputs by name, side tensors by name) -> TaskResult. The tasks not listed here
# are handled by `Postprocess` below.
ResultBuilder = Callable[
    [Postprocessor, postprocess_pb2.PostprocessRequest, dict[str, np.ndarray], dict[str, np.ndarray]],
    tasks_pb2.TaskResult,
]
# Builders cheap enough (microseconds) to run on the event loop; the others run in a thread.
INLINE_RESULTS = frozenset({"text-ranking"})
TASK_RESULTS: dict[str, ResultBuilder] = {
    "text-ranking": text_ranking,
    "token-classification": token_classification,
    "fill-mask": fill_mask,
    "question-answering": question_answering,
}


def classifications_pb(items: list[Labelled]) -> tasks_pb2.Classifications:
    return tasks_pb2.Classifications(
        items=[
            tasks_pb2.ClassificationList(
                labels=[
                    tasks_pb2.Classification(label=lbl, score=sc) for lbl, sc in zip(i.labels, i.scores, strict=True)
                ]
            )
            for i in items
        ]
    )


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServiceServicer):
    def __init__(self, core: Postprocessor, detokenizers: Detokenizers | None = None) -> None:
        self.core = core
        self.detokenizers = detokenizers

    async def Detokenize(self, request_iterator, context):
        state = None
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind == "start":
                if self.detokenizers is None:
                    raise invalid("this postprocess service has no generation models")
                state = self.detokenizers.start(request.start.model_id, list(request.start.stop))
                continue
            if state is None:
                raise invalid("a detokenization stream must begin with `start`")
            if kind == "prompt":
                yield postprocess_pb2.DetokenizeResponse(token_texts=state.prompt_texts(list(request.prompt.token_ids)))
                continue
            text, per_token, stopped = state.feed(list(request.tokens.token_ids), last=request.tokens.last)
            yield postprocess_pb2.DetokenizeResponse(text=text, token_texts=per_token, stopped=stopped)

    async def Postprocess(self, request: postprocess_pb2.PostprocessRequest, context):
        task = task_from_pb(request.task)
        outputs = {t.name: from_pb(t) for t in request.outputs}
        if task in TASK_RESULTS:
            side = {t.name: from_pb(t) for t in request.side_tensors}
            build = TASK_RESULTS[task]
            if task in INLINE_RESULTS:
                result = build(self.core, request, outputs, side)
            else:  # entity grouping, vocabulary softmax, span search: milliseconds, off the loop
                result = await asyncio.to_thread(build, self.core, request, outputs, side)
        elif task == "feature-extraction":
            normalize = request.parameters.normalize if request.parameters.HasField("normalize") else None
            dims = request.parameters.dimensions if request.parameters.HasField("dimensions") else None
            vectors = self.core.feature_extraction(request.model_id, outputs, normalize, dims)
            result = tasks_pb2.TaskResult(embeddings=to_pb("embeddings", vectors))
        elif task == "sentence-similarity":
            scores = self.core.sentence_similarity(request.model_id, outputs)
            result = tasks_pb2.TaskResult(similarities=tasks_pb2.Similarities(scores=scores.tolist()))
        elif task in ("text-classification", "image-classification"):
            p = request.parameters
            items = self.core.classify(
                request.model_id,
                outputs,
                top_k=p.top_k if p.HasField("top_k") else None,
                activation=ACTIVATION_OF.get(p.function_to_apply),
            )
            result = tasks_pb2.TaskResult(classifications=classifications_pb(items))
        elif task == "zero-shot-classification":
            p = request.parameters
            items = self.core.zero_shot(
                request.model_id,
                outputs,
                list(p.candidate_labels),
                multi_label=p.HasField("multi_label") and p.multi_label,
            )
            result = tasks_pb2.TaskResult(classifications=classifications_pb(items))
        else:
            raise invalid(f"postprocess does not handle task {task!r}", param="task")
        return postprocess_pb2.PostprocessResponse(result=result)

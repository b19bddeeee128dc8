"""question-answering in the HF task API: the request body -> typed inputs and parameters, and the
typed answers -> the JSON of transformers' QuestionAnsweringPipeline (what
`InferenceClient.question_answering` parses): {score, start, end, answer}, one object when a
question has one answer (top_k 1, the default), else a list, best first; a list per question when
several are asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshserve.tasks.v1 import tasks_pb2
from pydantic import BaseModel, ConfigDict, Field

from services.common.catalog import ModelEntry
from services.common.errors import invalid
from services.gateway.service.validation import parse

if TYPE_CHECKING:
    from services.gateway.api.hf_tasks import Dialect, HFRequest

UINT32_MAX = 2**32 - 1


class QuestionAnsweringInput(BaseModel):
    """One question about one context."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(..., min_length=1)
    context: str = Field(..., min_length=1)


class QuestionAnsweringParameters(BaseModel):
    """question-answering parameters (HF Inference API; the pipeline's defaults where unset)."""

    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(None, ge=1, le=UINT32_MAX, description="Answers per question (default 1).")
    doc_stride: int | None = Field(None, ge=0, le=UINT32_MAX, description="Tokens shared by neighbouring windows.")
    max_answer_len: int | None = Field(None, ge=1, le=UINT32_MAX, description="Longest answer in tokens (default 15).")
    max_seq_len: int | None = Field(
        None, ge=1, le=UINT32_MAX, description="Tokens per window (default min(384, limit))."
    )
    max_question_len: int | None = Field(
        None,
        ge=1,
        le=UINT32_MAX,
        description="Accepted; as in the pipeline with a fast tokenizer, questions are not cut.",
    )
    handle_impossible_answer: bool | None = Field(None, description="Allow the empty answer (default false).")
    align_to_words: bool | None = Field(None, description="Widen answers to whole words (default true).")


def parse_question_answering(entry: ModelEntry, inputs, params: dict, extra: dict) -> HFRequest:
    """The HF body's inputs ({question, context} or a list of them) and parameters, typed."""
    from services.gateway.api.hf_tasks import HFRequest

    if extra:
        raise invalid(f"unknown field(s) {sorted(extra)}: put task parameters under `parameters`")
    p = parse(QuestionAnsweringParameters, params, where="parameters")
    single = isinstance(inputs, dict)
    if not single and not (isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs)):
        raise invalid("`inputs` must be an object {question, context} or a list of them", param="inputs")
    items = [parse(QuestionAnsweringInput, inputs, where="inputs")] if single else [
        parse(QuestionAnsweringInput, item, where=f"inputs[{i}]") for i, item in enumerate(inputs)
    ]  # fmt: skip
    qa = tasks_pb2.QuestionAnsweringInputs(
        items=[tasks_pb2.QuestionAnsweringInput(question=i.question, context=i.context) for i in items]
    )
    parameters = tasks_pb2.TaskParameters(**p.model_dump(exclude_none=True))
    return HFRequest(tasks_pb2.TaskInputs(question_answering=qa), parameters, single)


def render_question_answering(result: tasks_pb2.TaskResult, request: HFRequest, dialect: Dialect):
    per_question = []
    for item in result.answers.items:
        answers = [{"score": a.score, "start": a.start, "end": a.end, "answer": a.answer} for a in item.answers]
        per_question.append(answers[0] if len(answers) == 1 else answers)  # the pipeline's unwrapping
    return per_question[0] if len(per_question) == 1 else per_question


def has_question_answering_shape(body: dict) -> bool:
    """A bare model URL's body asks for question-answering: inputs {question, context}."""
    inputs = body.get("inputs")
    return isinstance(inputs, dict) and "question" in inputs and "context" in inputs

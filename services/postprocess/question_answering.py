"""question-answering results: the HF QuestionAnsweringPipeline's span decoding in numpy.

Per window of a question: softmax of the start and end logits over the tokens that may be in an
answer, the k best (start, end) spans of at most max_answer_len tokens (transformers'
select_starts_ends and decode_spans), each mapped to characters of the context (whole words when
align_to_words) and merged with an earlier answer of the same text (scores added). Then the
"no answer" candidate (handle_impossible_answer: the smallest CLS score seen), best first, top_k.
The pipeline was removed from transformers 5; these are the rules of its last release (4.57).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from meshserve.postprocess.v1 import postprocess_pb2
from meshserve.tasks.v1 import tasks_pb2

from services.common.errors import ErrorCode, MeshError, invalid

SIDE = ("qa_item", "qa_length", "qa_p_mask", "qa_offsets", "qa_word_ids", "qa_sequence_ids", "qa_context_sequence")
NO_NULL_SCORE = 1000000  # the pipeline's starting min_null_score: "large and positive"


@dataclass(frozen=True)
class Settings:
    """The postprocess parameters of one request (the pipeline's defaults where unset)."""

    top_k: int
    max_answer_len: int
    handle_impossible_answer: bool
    align_to_words: bool


def decode_spans(start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int, undesired: np.ndarray):
    """transformers' decode_spans: the topk (start, end) pairs by probability, end >= start, at most
    max_answer_len tokens, both ends on tokens that may be in an answer."""
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) <= topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    allowed = undesired.nonzero()  # (rows, columns) of a [1, tokens] array, both searched, as there
    desired = np.isin(starts, allowed) & np.isin(ends, allowed)
    starts, ends = starts[desired], ends[desired]
    return starts, ends, candidates[0, starts, ends]


def select_starts_ends(start, end, p_mask, min_null_score: float, topk: int, settings: Settings):
    """transformers' select_starts_ends for one window ([1, tokens] logits, unpadded)."""
    undesired = np.abs(np.array(p_mask) - 1) & np.ones_like(p_mask)
    masked = undesired == 0.0
    start = np.where(masked, -10000.0, start)
    end = np.where(masked, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if settings.handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0
    starts, ends, scores = decode_spans(start, end, topk, settings.max_answer_len, undesired)
    return starts, ends, scores, min_null_score


@dataclass(frozen=True)
class Window:
    """One window's per-token facts (unpadded): character offsets, word and sequence ids."""

    offsets: np.ndarray
    word_ids: np.ndarray
    sequence_ids: np.ndarray
    context: int  # the sequence index of the context

    def word_chars(self, word: int) -> tuple[int, int] | None:
        """tokenizers' Encoding.word_to_chars(word, context sequence) within this window."""
        tokens = np.nonzero((self.word_ids == word) & (self.sequence_ids == self.context))[0]
        if not len(tokens):
            return None
        return int(self.offsets[tokens[0], 0]), int(self.offsets[tokens[-1], 1])

    def chars(self, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
        """The pipeline's get_indices: the span's characters, widened to whole words if asked and
        the tokenizer knows words; token offsets otherwise."""
        if align_to_words:
            first, last = int(self.word_ids[s]), int(self.word_ids[e])
            start = self.word_chars(first) if first >= 0 else None
            end = self.word_chars(last) if last >= 0 else None
            if start is not None and end is not None:
                return start[0], end[1]
        return int(self.offsets[s, 0]), int(self.offsets[e, 1])


def answers_of(context: str, windows: list[tuple[np.ndarray, np.ndarray, np.ndarray, Window]], settings: Settings):
    """One question's answers from its windows (start logits, end logits, p_mask, facts), best
    first: the pipeline's postprocess."""
    min_null_score = NO_NULL_SCORE
    answers: list[dict] = []
    topk = settings.top_k * 2 + 10 if settings.align_to_words else settings.top_k  # aligning merges some
    for start, end, p_mask, window in windows:
        starts, ends, scores, min_null_score = select_starts_ends(
            start[None], end[None], p_mask[None], min_null_score, topk, settings
        )
        for s, e, score in zip(starts, ends, scores, strict=True):
            first, last = window.chars(int(s), int(e), settings.align_to_words)
            text = context[first:last]
            same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
            if same:
                same["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": first, "end": last, "answer": text})
    if settings.handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda a: a["score"], reverse=True)[: settings.top_k]


def settings_of(entry, parameters) -> Settings:
    p = parameters
    settings = Settings(
        top_k=p.top_k if p.HasField("top_k") else 1,
        max_answer_len=p.max_answer_len if p.HasField("max_answer_len") else entry.postprocess.max_answer_len,
        handle_impossible_answer=p.HasField("handle_impossible_answer") and p.handle_impossible_answer,
        align_to_words=p.align_to_words if p.HasField("align_to_words") else True,
    )
    if settings.top_k < 1:
        raise invalid(f"top_k parameter should be >= 1 (got {settings.top_k})", param="top_k")
    if settings.max_answer_len < 1:
        raise invalid(
            f"max_answer_len parameter should be >= 1 (got {settings.max_answer_len})", param="max_answer_len"
        )
    return settings


def _checked(entry, outputs: dict, side: dict, questions: int) -> tuple[np.ndarray, np.ndarray]:
    """(start logits, end logits) after checking they and the side tensors describe the same windows."""
    start, end = outputs.get("start_logits"), outputs.get("end_logits")
    missing = [name for name in SIDE if name not in side]
    if start is None or end is None or missing:
        raise MeshError(
            ErrorCode.INTERNAL, f"question-answering of {entry.id!r} lacks its logits or side tensors {missing}"
        )
    rows = side["qa_p_mask"].shape[0]
    items = side["qa_item"]
    if (
        start.shape != end.shape or start.ndim != 2 or start.shape[0] != rows or start.shape[1] < side["qa_length"].max()
        or len(items) != rows or (rows and (items.min() < 0 or items.max() >= questions))
    ):  # fmt: skip
        raise MeshError(ErrorCode.INTERNAL, f"question-answering of {entry.id!r}: outputs do not match the inputs")
    return start.astype(np.float32, copy=False), end.astype(np.float32, copy=False)


def question_answering(
    core, request: postprocess_pb2.PostprocessRequest, outputs: dict, side: dict
) -> tasks_pb2.TaskResult:
    """TaskResult.answers: per question, its answers best first."""
    entry = core.catalog.get(request.model_id)
    if request.inputs.WhichOneof("kind") != "question_answering":
        raise invalid("question-answering needs the request's questions and contexts", param="inputs")
    contexts = [item.context for item in request.inputs.question_answering.items]
    settings = settings_of(entry, request.parameters)
    start, end = _checked(entry, outputs, side, len(contexts))
    context_sequence = int(side["qa_context_sequence"].reshape(-1)[0])
    per_item: list[list] = [[] for _ in contexts]
    for w, (item, length) in enumerate(zip(side["qa_item"].tolist(), side["qa_length"].tolist(), strict=True)):
        facts = Window(
            side["qa_offsets"][w, :length], side["qa_word_ids"][w, :length], side["qa_sequence_ids"][w, :length],
            context_sequence,
        )  # fmt: skip
        per_item[item].append((start[w, :length], end[w, :length], side["qa_p_mask"][w, :length], facts))
    items = []
    for context, windows in zip(contexts, per_item, strict=True):
        found = answers_of(context, windows, settings)
        items.append(tasks_pb2.AnswerList(answers=[tasks_pb2.Answer(**a) for a in found]))
    return tasks_pb2.TaskResult(answers=tasks_pb2.Answers(items=items))

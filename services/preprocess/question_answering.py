"""question-answering inputs: each question and its context cut into windows exactly as the HF
QuestionAnsweringPipeline does (transformers' fast tokenizer: truncation of the context only,
max_seq_len tokens per window, doc_stride tokens shared by neighbours, overflowing windows kept);
every window is one row, the rows padded to the longest window.

Side tensors for postprocess, per window w and token t: `qa_item` INT64 [w] (the question it
belongs to), `qa_length` INT64 [w] (its tokens before padding), `qa_p_mask` INT64 [w, t] (1: the
token cannot be in an answer, the pipeline's p_mask), `qa_offsets` INT64 [w, t, 2] (character span
in the context), `qa_word_ids` and `qa_sequence_ids` INT64 [w, t] (-1: none), and
`qa_context_sequence` INT64 [1] (which sequence of the pair is the context).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from meshserve.preprocess.v1 import preprocess_pb2

from services.common import tracing
from services.common.catalog import ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.preprocess.core import TOKENS, Encoded, Preprocessor

TASK = "question-answering"
PIPELINE_MAX_SEQ_LEN = 384  # the pipeline's default window: min(model_max_length, 384)


@dataclass(frozen=True)
class QATokenizer:
    """A model's transformers fast tokenizer; the lock keeps one call at a time (each call sets
    the backend's truncation)."""

    tokenizer: object
    lock: threading.Lock

    @property
    def question_first(self) -> bool:
        return self.tokenizer.padding_side == "right"


@lru_cache(maxsize=32)
def qa_tokenizer(folder: Path) -> QATokenizer:
    """The fast tokenizer of a model folder, loaded once per folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tokenizer, "is_fast", False):
        raise invalid(f"{TASK} needs a fast tokenizer (tokenizer.json) in the model's folder", param="model")
    return QATokenizer(tokenizer, threading.Lock())


@dataclass(frozen=True)
class Windowing:
    """How a request's contexts are cut: tokens per window, tokens shared by neighbours."""

    max_seq_len: int
    doc_stride: int


def windowing(entry: ModelEntry, tok: QATokenizer, params) -> Windowing:
    """The request's windowing: its max_seq_len / doc_stride, else the pipeline's defaults (capped
    by the model's token limit, where the pipeline would fail)."""
    limit = entry.preprocess.max_length
    if params.HasField("max_seq_len"):
        max_seq_len = params.max_seq_len
        if not 1 <= max_seq_len <= limit:
            raise invalid(f"`max_seq_len` must be between 1 and this model's limit of {limit}", param="max_seq_len")
    else:
        max_seq_len = min(tok.tokenizer.model_max_length, PIPELINE_MAX_SEQ_LEN, limit)
    doc_stride = (
        params.doc_stride if params.HasField("doc_stride") else min(max_seq_len // 2, entry.preprocess.doc_stride)
    )
    if doc_stride > max_seq_len:
        raise invalid(f"`doc_stride` ({doc_stride}) is larger than `max_seq_len` ({max_seq_len})", param="doc_stride")
    if params.HasField("max_question_len") and params.max_question_len < 1:
        raise invalid("`max_question_len` must be at least 1", param="max_question_len")
    return Windowing(max_seq_len, doc_stride)


def windows_of(tok: QATokenizer, question: str, context: str, cut: Windowing, index: int) -> list:
    """The pipeline's tokenizer call: one `tokenizers.Encoding` per window."""
    first, second = (question, context) if tok.question_first else (context, question)
    try:
        with tok.lock:
            encoded = tok.tokenizer(
                text=first, text_pair=second, padding=False,
                truncation="only_second" if tok.question_first else "only_first",
                max_length=cut.max_seq_len, stride=cut.doc_stride, return_token_type_ids=True,
                return_overflowing_tokens=True, return_offsets_mapping=True,
            )  # fmt: skip
    except Exception as exc:  # the tokenizer refuses e.g. a question that leaves no room for context
        raise invalid(f"`inputs[{index}]` cannot be cut into windows: {exc}", param="inputs") from None
    return list(encoded.encodings)


def p_mask(tok: QATokenizer, encoding) -> list[int]:
    """The pipeline's p_mask: 1 for tokens outside the context, except the CLS token."""
    mask = [int(s != 1) if tok.question_first else 0 for s in encoding.sequence_ids]
    cls = tok.tokenizer.cls_token_id
    if cls is not None:
        mask = [0 if token == cls else m for m, token in zip(mask, encoding.ids, strict=True)]
    return mask


def _none_as(values: list, missing: int = -1) -> list[int]:
    return [missing if v is None else v for v in values]


def window_arrays(tok: QATokenizer, windows: list) -> dict[str, np.ndarray]:
    """Each window's tokens and its per-token facts, padded to the longest window."""
    n, width = len(windows), max(len(e.ids) for e in windows)
    pad_id = tok.tokenizer.pad_token_id or 0
    arrays = {
        "input_ids": np.full((n, width), pad_id, dtype=np.int64),
        "attention_mask": np.zeros((n, width), dtype=np.int64),
        "token_type_ids": np.zeros((n, width), dtype=np.int64),
        "qa_p_mask": np.ones((n, width), dtype=np.int64),
        "qa_offsets": np.zeros((n, width, 2), dtype=np.int64),
        "qa_word_ids": np.full((n, width), -1, dtype=np.int64),
        "qa_sequence_ids": np.full((n, width), -1, dtype=np.int64),
    }
    for w, e in enumerate(windows):
        k = len(e.ids)
        arrays["input_ids"][w, :k] = e.ids
        arrays["attention_mask"][w, :k] = e.attention_mask
        arrays["token_type_ids"][w, :k] = e.type_ids
        arrays["qa_p_mask"][w, :k] = p_mask(tok, e)
        arrays["qa_offsets"][w, :k] = np.asarray(e.offsets, dtype=np.int64).reshape(k, 2)
        arrays["qa_word_ids"][w, :k] = _none_as(e.word_ids)
        arrays["qa_sequence_ids"][w, :k] = _none_as(e.sequence_ids)
    return arrays


def encode(entry: ModelEntry, names: tuple[str, ...], tok: QATokenizer, items: list, cut: Windowing) -> Encoded:
    """Model inputs (the catalog's `names`) and side tensors of the request's windows."""
    owners, windows = [], []
    for i, (question, context) in enumerate(items):
        own = windows_of(tok, question, context, cut, i)
        owners += [i] * len(own)
        windows += own
        if len(windows) > entry.preprocess.max_items:
            raise MeshError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the contexts make more than {entry.preprocess.max_items} windows of {cut.max_seq_len} tokens, "
                "this model's limit per request; send shorter contexts or a larger max_seq_len",
                param="inputs",
            )
    arrays = window_arrays(tok, windows)
    lengths = arrays["attention_mask"].sum(axis=1)
    item_tokens = np.bincount(np.array(owners), weights=lengths, minlength=len(items)).astype(int).tolist()
    side = {name: arrays[name] for name in arrays if name.startswith("qa_")}
    side["qa_item"] = np.array(owners, dtype=np.int64)
    side["qa_length"] = lengths.astype(np.int64)
    side["qa_context_sequence"] = np.array([1 if tok.question_first else 0], dtype=np.int64)
    TOKENS.labels(entry.id).inc(int(lengths.sum()))
    tensors = {name: arrays[name] for name in names}
    return Encoded(tensors, int(lengths.sum()), len(items), item_tokens, side=side)


def items_of(entry: ModelEntry, inputs) -> list[tuple[str, str]]:
    """The request's (question, context) pairs, checked as the pipeline checks them, and sized."""
    if inputs.WhichOneof("kind") != "question_answering":
        raise invalid(f"{TASK} takes {{question, context}} inputs", param="inputs")
    items = [(item.question, item.context) for item in inputs.question_answering.items]
    if not items:
        raise invalid("`inputs` must contain at least one {question, context}", param="inputs")
    if len(items) > entry.preprocess.max_items:
        raise MeshError(ErrorCode.PAYLOAD_TOO_LARGE, f"`inputs` has {len(items)} questions; this model takes at "
                        f"most {entry.preprocess.max_items} per request", param="inputs")  # fmt: skip
    for i, (question, context) in enumerate(items):
        for name, value in (("question", question), ("context", context)):
            where = "inputs" if len(items) == 1 else f"inputs[{i}]"
            if not value:
                raise invalid(f"`{where}.{name}` cannot be empty", param=f"{where}.{name}")
            if len(value) > entry.preprocess.max_chars:
                raise MeshError(ErrorCode.PAYLOAD_TOO_LARGE, f"`{where}.{name}` has {len(value)} characters; the "
                                f"limit is {entry.preprocess.max_chars}", param=f"{where}.{name}")  # fmt: skip
    return items


async def encode_question_answering(core: Preprocessor, request: preprocess_pb2.PreprocessRequest) -> Encoded:
    """The request's questions and contexts as windows (rows) plus the side tensors of QA."""
    entry = core.catalog.get(request.model_id)
    core.catalog.resolve_task(entry, TASK)
    items = items_of(entry, request.inputs)
    pre = core.text(request.model_id)
    tok = await asyncio.to_thread(qa_tokenizer, pre.folder)  # the first call loads transformers
    cut = windowing(entry, tok, request.parameters)
    with tracing.span("tokenize", model=request.model_id, texts=len(items)) as span:
        # Always in a thread: the tokenizer's lock may be held by another request's thread, and
        # waiting for it on the event loop would stall every request of this process.
        encoded = await asyncio.to_thread(encode, entry, pre.input_names, tok, items, cut)
        span.set_attribute("tokens", encoded.input_tokens)
    return encoded

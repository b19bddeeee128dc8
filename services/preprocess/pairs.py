"""Text pairs: text-classification on {text, text_pair} (NLI, a cross-encoder's pair) and
text-ranking (a query against each document). Each pair is encoded together by the model's own
fast tokenizer, as transformers' pipeline and sentence-transformers' CrossEncoder do: its pair
template (segments in token_type_ids) and 'longest_first' truncation to the model's limit."""

from __future__ import annotations

import asyncio

from meshserve.preprocess.v1 import preprocess_pb2

from services.common import tracing
from services.common.errors import invalid
from services.preprocess.core import INLINE_CHARS, Encoded, Preprocessor, TextPreprocessor

Pair = tuple[str, str]


def encode_pairs(pre: TextPreprocessor, pairs: list[Pair], *, truncate: bool, field: str) -> Encoded:
    """Pairs -> the model's input tensors, one row per pair (padded to the longest)."""
    return pre.encode_items(pairs, truncate=truncate, field=field, what=" with its pair")[1]


async def encode(
    core: Preprocessor, model_id: str, task: str, pairs: list[Pair], *, truncate: bool, field: str
) -> Encoded:
    """Checks the pairs (count, each text non-empty and within the character cap), then encodes
    them; long requests in a thread so the event loop stays free."""
    core.catalog.resolve_task(core.catalog.get(model_id), task)
    pre = core.text(model_id)
    if not pairs:
        raise invalid(f"`{field}` must contain at least one pair", param=field)
    pre.validate([a for a, _ in pairs], field=field)  # the count, and each first text
    pre.validate([b for _, b in pairs], field=field)
    with tracing.span("tokenize", model=model_id, texts=len(pairs)) as span:
        if sum(len(a) + len(b) for a, b in pairs) <= INLINE_CHARS:
            encoded = encode_pairs(pre, pairs, truncate=truncate, field=field)
        else:
            encoded = await asyncio.to_thread(encode_pairs, pre, pairs, truncate=truncate, field=field)
        span.set_attribute("tokens", encoded.input_tokens)
    return encoded


def _truncate(request: preprocess_pb2.PreprocessRequest) -> bool:
    params = request.parameters
    return params.truncate if params.HasField("truncate") else True


async def encode_text_classification(core: Preprocessor, request: preprocess_pb2.PreprocessRequest) -> Encoded:
    """text-classification: pairs when the inputs are `text_pairs`, else single texts as before."""
    inputs, task = request.inputs, "text-classification"
    kind = inputs.WhichOneof("kind")
    if kind == "text":
        texts = list(inputs.text.texts)
        return await core.encode_texts(request.model_id, task, texts, truncate=_truncate(request), field="inputs")
    if kind != "text_pairs":
        raise invalid("text-classification takes texts or text pairs", param="inputs")
    pairs = [(p.text, p.text_pair) for p in inputs.text_pairs.pairs]
    return await encode(core, request.model_id, task, pairs, truncate=_truncate(request), field="inputs")


async def encode_text_ranking(core: Preprocessor, request: preprocess_pb2.PreprocessRequest) -> Encoded:
    """text-ranking: one (query, document) pair per document, in document order."""
    if request.inputs.WhichOneof("kind") != "text_ranking":
        raise invalid("text-ranking takes {query, documents}", param="inputs")
    ranking = request.inputs.text_ranking
    if not ranking.query.strip():
        raise invalid("`inputs.query` is empty", param="inputs.query")
    if not ranking.documents:
        raise invalid("`inputs.documents` must contain at least one document", param="inputs.documents")
    pairs = [(ranking.query, doc) for doc in ranking.documents]
    truncate = _truncate(request)
    return await encode(core, request.model_id, "text-ranking", pairs, truncate=truncate, field="inputs.documents")

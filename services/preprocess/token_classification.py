"""token-classification inputs: the texts tokenized with the model's fast tokenizer, as the HF
pipeline does (special tokens added, truncated to the model's limit), padded to the longest text.

Besides the model inputs, postprocess gets per token what it needs to name entities (side tensors):
`token_ids` INT64 [n, tokens] (the token's text, the unknown-token rule), `offsets` INT64
[n, tokens, 2] (character spans in the text) and `special_tokens_mask` UINT8 [n, tokens] (1 for
special and padding tokens, which are never entities).
"""

from __future__ import annotations

import numpy as np
from meshserve.preprocess.v1 import preprocess_pb2

from services.common.errors import invalid
from services.preprocess.core import TOKENS, TRUNCATED, Encoded, Preprocessor, TextPreprocessor

TASK = "token-classification"


def encode(pre: TextPreprocessor, texts: list[str], *, truncate: bool) -> Encoded:
    """Model inputs and side tensors of the texts (the catalog's inputs, in order)."""
    encodings = pre.tokenizer.encode_batch(texts)
    cut = [i for i, e in enumerate(encodings) if e.overflowing]
    if cut and not truncate:
        raise invalid(
            f"`inputs[{cut[0]}]` is longer than this model's limit of {pre.limit} tokens; "
            "shorten it or allow truncation (`truncate: true`)",
            param="inputs",
        )
    tensors = pre.tensors(encodings)
    per_item = tensors["attention_mask"].sum(axis=1).tolist()
    TOKENS.labels(pre.entry.id).inc(sum(per_item))
    if cut:
        TRUNCATED.labels(pre.entry.id).inc(len(cut))
    side = {
        "token_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "offsets": np.array([e.offsets for e in encodings], dtype=np.int64).reshape(len(texts), -1, 2),
        "special_tokens_mask": np.array([e.special_tokens_mask for e in encodings], dtype=np.uint8),
    }
    return Encoded(tensors, sum(per_item), len(texts), per_item, side=side)


async def encode_token_classification(core: Preprocessor, request: preprocess_pb2.PreprocessRequest) -> Encoded:
    """The request's texts as model inputs plus the side tensors of token-classification."""
    params = request.parameters
    truncate = params.truncate if params.HasField("truncate") else True
    return await core.encode_task_texts(request.model_id, TASK, request.inputs, truncate, encode)

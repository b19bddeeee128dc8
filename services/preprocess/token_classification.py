"""token-classification inputs: the texts tokenized with the model's fast tokenizer, as the HF
pipeline does (special tokens added, truncated to the model's limit), padded to the longest text.

Besides the model inputs, postprocess gets per token what it needs to name entities (side tensors):
`token_ids` INT64 [n, tokens] (the token's text, the unknown-token rule), `offsets` INT64
[n, tokens, 2] (character spans in the text) and `special_tokens_mask` UINT8 [n, tokens] (1 for
special and padding tokens, which are never entities).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from meshserve.preprocess.v1 import preprocess_pb2

from services.preprocess.core import Encoded, Preprocessor, TextPreprocessor

TASK = "token-classification"


def encode(pre: TextPreprocessor, texts: list[str], *, truncate: bool) -> Encoded:
    """Model inputs and side tensors of the texts (the catalog's inputs, in order)."""
    encodings, encoded = pre.encode_items(texts, truncate=truncate, field="inputs")
    side = {
        "token_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "offsets": np.array([e.offsets for e in encodings], dtype=np.int64).reshape(len(texts), -1, 2),
        "special_tokens_mask": np.array([e.special_tokens_mask for e in encodings], dtype=np.uint8),
    }
    return dataclasses.replace(encoded, side=side)


async def encode_token_classification(core: Preprocessor, request: preprocess_pb2.PreprocessRequest) -> Encoded:
    """The request's texts as model inputs plus the side tensors of token-classification."""
    params = request.parameters
    truncate = params.truncate if params.HasField("truncate") else True
    return await core.encode_task_texts(request.model_id, TASK, request.inputs, truncate, encode)

"""fill-mask inputs: the texts tokenized as the HF pipeline does (special tokens added), each with
at least one mask token, padded to the longest text.

Every row of a request carries as many mask tokens as its row with the most: the extra ones sit in
padding (attention 0, so no real token sees them). The runtime's `mask_logits` then have the same
width in every chunk of a request the gateway splits by max_batch_size, and chunks join.
Side tensors for postprocess: `fill_mask_ids` INT64 [n, tokens], the text's own token ids (-1 in
padding and where the pipeline drops pad tokens), `fill_mask_masks` UINT8 [n, tokens], 1 at
the text's mask tokens, and `fill_mask_pad` INT64 [1], the pad token's id (-1: none).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from meshserve.preprocess.v1 import preprocess_pb2

from services.common.errors import invalid
from services.preprocess.core import Encoded, Preprocessor, TextPreprocessor, pad_token_of

TASK = "fill-mask"


@lru_cache(maxsize=64)
def special_ids(folder: Path) -> tuple[str, int, int | None]:
    """(mask token, its id, the pad token's id or None) from the folder's tokenizer files."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            token = json.loads(path.read_text()).get("mask_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
                return token, int(tokenizer.token_to_id(token)), tokenizer.token_to_id(pad_token_of(folder, tokenizer))
    raise invalid(f"model at {folder.name} defines no mask token: it cannot serve {TASK}", param="model")


def equalize_masks(tensors: dict[str, np.ndarray], mask_id: int, pad_id: int, limit: int) -> dict[str, np.ndarray]:
    """Mask tokens put into each row's padding until every row has as many as the one with most
    (columns of padding added where a row has too little)."""
    ids = tensors["input_ids"]
    counts = (ids == mask_id).sum(axis=1)
    lengths = tensors["attention_mask"].sum(axis=1)
    width = max(int((lengths + counts.max() - counts).max()), ids.shape[1])
    if width > limit:
        raise invalid(
            f"these texts need {width} tokens with their masks aligned; the model takes {limit}: send texts "
            "with the same number of masks, or fewer texts",
            param="inputs",
        )
    out = {
        name: np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=pad_id if name == "input_ids" else 0)
        for name, array in tensors.items()
    }
    for row, (length, missing) in enumerate(zip(lengths, counts.max() - counts, strict=True)):
        out["input_ids"][row, length : length + missing] = mask_id
    return out


def encode(pre: TextPreprocessor, texts: list[str], *, truncate: bool) -> Encoded:
    """Model inputs and the side tensors of fill-mask; 400 for a text without the mask token."""
    encoded = pre.encode(texts, truncate=truncate, field="inputs")
    mask_token, mask_id, pad_id = special_ids(pre.folder)
    ids, attention = encoded.tensors["input_ids"], encoded.tensors["attention_mask"]
    masks = (ids == mask_id) & (attention == 1)
    for row in np.nonzero(~masks.any(axis=1))[0]:
        where = "inputs" if len(texts) == 1 else f"inputs[{row}]"
        raise invalid(f"No mask_token ({mask_token}) found on the input `{where}`", param=where)
    own = np.where((attention == 1) & (ids != (-1 if pad_id is None else pad_id)), ids, -1)
    side = {
        "fill_mask_ids": own.astype(np.int64),
        "fill_mask_masks": masks.astype(np.uint8),
        "fill_mask_pad": np.array([-1 if pad_id is None else pad_id], dtype=np.int64),
    }
    padding = pre.tokenizer.padding["pad_id"] if pre.tokenizer.padding else 0
    tensors = equalize_masks(encoded.tensors, mask_id, padding, pre.limit) if len(texts) > 1 else encoded.tensors
    return Encoded(tensors, encoded.input_tokens, encoded.items, encoded.item_tokens, side=side)


async def encode_fill_mask(core: Preprocessor, request: preprocess_pb2.PreprocessRequest) -> Encoded:
    """The request's texts as model inputs plus the side tensors of fill-mask."""
    params = request.parameters
    truncate = params.truncate if params.HasField("truncate") else True
    return await core.encode_task_texts(request.model_id, TASK, request.inputs, truncate, encode)

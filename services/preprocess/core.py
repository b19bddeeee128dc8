"""Text preprocessing: validation, fast (Rust) tokenization, truncation, token counts.

Transport-neutral: takes Python values, returns numpy arrays; raises MeshError for bad input.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import Counter
from tokenizers import Tokenizer

from services.common import tracing
from services.common.catalog import Catalog, ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.common.modelstore import model_dir

TOKENS = Counter("meshserve_preprocess_tokens_total", "Input tokens produced, after truncation.", ["model"])
TRUNCATED = Counter("meshserve_preprocess_truncated_total", "Texts cut to the model's token limit.", ["model"])

# Below this many characters a request is tokenized inline: a thread hop costs more than the work.
INLINE_CHARS = 4096


@dataclass(frozen=True)
class Encoded:
    """Model inputs for one request plus what it cost."""

    tensors: dict[str, np.ndarray]
    input_tokens: int
    items: int
    item_tokens: list[int]


class TextPreprocessor:
    """Tokenizes for one model. The tokenizer pads to the longest text of the request."""

    def __init__(self, entry: ModelEntry, folder: Path) -> None:
        self.entry = entry
        self.limit = entry.preprocess.max_length
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=self.limit)
        pad_id = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0, pad_token="[PAD]")
        self.tokenizer = tokenizer

    def validate(self, texts: list[str], *, field: str) -> None:
        spec = self.entry.preprocess
        if not texts:
            raise invalid(f"`{field}` must contain at least one text", param=field)
        if len(texts) > spec.max_items:
            raise MeshError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"`{field}` has {len(texts)} texts; this model takes at most {spec.max_items} per request",
                param=field,
            )
        for i, text in enumerate(texts):
            if not text.strip():
                raise invalid(f"`{field}[{i}]` is empty", param=field)
            if len(text) > spec.max_chars:
                raise MeshError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"`{field}[{i}]` has {len(text)} characters; the limit is {spec.max_chars}",
                    param=field,
                )

    def encode(self, texts: list[str], *, truncate: bool, field: str) -> Encoded:
        encodings = self.tokenizer.encode_batch(texts)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut and not truncate:
            raise invalid(
                f"`{field}[{cut[0]}]` is longer than this model's limit of {self.limit} tokens; "
                "shorten it or allow truncation (`truncate: true`)",
                param=field,
            )
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        per_item = mask.sum(axis=1).tolist()
        tokens = sum(per_item)
        TOKENS.labels(self.entry.id).inc(tokens)
        if cut:
            TRUNCATED.labels(self.entry.id).inc(len(cut))
        return Encoded({"input_ids": ids, "attention_mask": mask}, tokens, len(texts), per_item)


class Preprocessor:
    """All models' preprocessors, built from the catalog and the model store at start."""

    def __init__(self, catalog: Catalog, models_dir: Path) -> None:
        self.catalog = catalog
        self._text = {entry.id: TextPreprocessor(entry, model_dir(entry, models_dir)) for entry in catalog.models}

    async def encode_texts(self, model_id: str, task: str, texts: list[str], *, truncate: bool, field: str) -> Encoded:
        entry = self.catalog.get(model_id)
        self.catalog.resolve_task(entry, task)
        pre = self._text[entry.id]
        pre.validate(texts, field=field)
        with tracing.span("tokenize", model=model_id, texts=len(texts)) as span:
            if sum(len(t) for t in texts) <= INLINE_CHARS:
                encoded = pre.encode(texts, truncate=truncate, field=field)
            else:
                encoded = await asyncio.to_thread(pre.encode, texts, truncate=truncate, field=field)
            span.set_attribute("tokens", encoded.input_tokens)
        return encoded

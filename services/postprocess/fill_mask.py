"""fill-mask results: transformers' FillMaskPipeline.postprocess in numpy. Per mask token of each
text: softmax over the vocabulary (or over the `targets` only), the top_k tokens best first, each
with its text and the input with the mask replaced, decoded by the model's own tokenizer (the
folder's tokenizer.json, decoded as transformers' fast tokenizers decode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from meshserve.postprocess.v1 import postprocess_pb2
from meshserve.tasks.v1 import tasks_pb2
from tokenizers import Tokenizer

from services.common.errors import ErrorCode, MeshError, invalid
from services.postprocess.core import Postprocessor, softmax

DEFAULT_TOP_K = 5  # the pipeline's
SIDE = ("fill_mask_ids", "fill_mask_masks", "fill_mask_pad")


def clean_up_tokenization(text: str) -> str:
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class Detokenizer:
    """A model's fast tokenizer and its decode settings (tokenizer_config.json)."""

    tokenizer: Tokenizer
    clean_up: bool

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """transformers' TokenizersBackend.decode."""
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up else text

    def target_ids(self, targets: list[str]) -> np.ndarray:
        """FillMaskPipeline.get_target_ids: a target in the vocabulary is its id, else the first
        token it encodes to (skipped if none); duplicates removed as the pipeline removes them."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        ids = []
        for target in targets:
            token_id = vocab.get(target)
            if token_id is None:
                encoded = self.tokenizer.encode(target, add_special_tokens=False).ids
                if not encoded:
                    continue
                token_id = encoded[0]
            ids.append(token_id)
        if not ids:
            raise invalid("At least one target must be provided when passed.", param="parameters.targets")
        return np.array(list(set(ids)))


@lru_cache(maxsize=32)
def detokenizer(folder: Path) -> Detokenizer:
    """The detokenizer of a model folder, read once per folder."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    bpe = type(tokenizer.model).__name__ == "BPE"
    forced = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
    clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (not bpe or forced)
    return Detokenizer(tokenizer, clean_up)


def top(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first (torch.topk's order)."""
    if k < probs.shape[-1]:
        part = np.argpartition(-probs, k - 1)[:k]
        return part[np.argsort(-probs[part], kind="stable")]
    return np.argsort(-probs, kind="stable")[:k]


def fills_of(
    logits: np.ndarray, ids: np.ndarray, masks: np.ndarray, pad: int, top_k: int, targets, tok: Detokenizer
) -> tasks_pb2.FillMaskItem:
    """One text's candidates per mask (logits [masks, vocab], its own token ids, mask flags)."""
    positions = np.nonzero(masks)[0]
    single = len(positions) == 1
    keep = ids >= 0
    item = tasks_pb2.FillMaskItem()
    for i, position in enumerate(positions):
        probs = softmax(logits[i].astype(np.float32, copy=False))
        if targets is not None:
            probs = probs[targets]
        fills = item.masks.add().fills
        for p in top(probs, top_k):
            token = int(targets[p]) if targets is not None else int(p)
            tokens = ids.copy()
            tokens[position] = token
            tokens = tokens[keep & (tokens != pad)]
            fills.add(
                score=float(probs[p]),
                token=token,
                token_str=tok.decode([token]),
                sequence=tok.decode(tokens.tolist(), skip_special_tokens=single),
            )
    return item


def fill_mask(
    core: Postprocessor, request: postprocess_pb2.PostprocessRequest, outputs: dict, side: dict
) -> tasks_pb2.TaskResult:
    """TaskResult.fill_mask: per text, per mask token, its top_k candidates best first."""
    entry = core.catalog.get(request.model_id)
    logits = outputs.get("mask_logits")
    missing = [name for name in SIDE if name not in side]
    if logits is None or logits.ndim != 3 or missing:
        raise MeshError(
            ErrorCode.INTERNAL, f"fill-mask of {entry.id!r} lacks its mask_logits or side tensors {missing}"
        )
    ids, masks = side["fill_mask_ids"], side["fill_mask_masks"]
    if logits.shape[0] != ids.shape[0] or masks.shape != ids.shape or logits.shape[1] < masks.sum(axis=1).max():
        raise MeshError(ErrorCode.INTERNAL, f"fill-mask of {entry.id!r}: outputs do not match the inputs")
    tok = detokenizer(core.folder(entry))
    p = request.parameters
    top_k = p.top_k if p.HasField("top_k") else DEFAULT_TOP_K
    if top_k < 1:
        raise invalid("`parameters.top_k` must be at least 1", param="parameters.top_k")
    targets = tok.target_ids(list(p.targets)) if p.targets else None
    if targets is not None:
        top_k = min(top_k, len(targets))
    pad = int(side["fill_mask_pad"].reshape(-1)[0])
    items = [fills_of(logits[row], ids[row], masks[row], pad, top_k, targets, tok) for row in range(ids.shape[0])]
    return tasks_pb2.TaskResult(fill_mask=tasks_pb2.FillMaskResults(items=items))

"""token-classification results: per-token softmax, then the HF pipeline's grouping of tokens into
entities (aggregation none / simple / first / average / max), labels from the catalog, words from
the model's tokenizer and character offsets into the request's texts.

The rules are transformers' TokenClassificationPipeline's (gather_pre_entities, aggregate,
aggregate_word(s), group_entities), in numpy: a token is a subword when the tokenizer marks
continuations (WordPiece's "##": its text is longer than its span) or, for tokenizers that do not,
when no space touches its start; an unknown token takes its span's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import numpy as np
from meshserve.postprocess.v1 import postprocess_pb2
from meshserve.tasks.v1 import tasks_pb2
from tokenizers import Tokenizer

from services.common.catalog import ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.postprocess.core import Postprocessor, softmax

STRATEGIES = {
    tasks_pb2.AGGREGATION_STRATEGY_NONE: "none",
    tasks_pb2.AGGREGATION_STRATEGY_SIMPLE: "simple",
    tasks_pb2.AGGREGATION_STRATEGY_FIRST: "first",
    tasks_pb2.AGGREGATION_STRATEGY_AVERAGE: "average",
    tasks_pb2.AGGREGATION_STRATEGY_MAX: "max",
}
SIDE = ("token_ids", "offsets", "special_tokens_mask")


@dataclass(frozen=True)
class Vocabulary:
    """What names a model's tokens: its fast tokenizer (token texts, the decoder that joins them),
    its unknown token, and whether it marks continuing subwords (real word boundaries)."""

    tokenizer: Tokenizer
    unk_id: int | None
    word_aware: bool

    def token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def join(self, tokens: list[str]) -> str:
        """transformers' convert_tokens_to_string of a fast tokenizer."""
        decoder = self.tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)


def _unk_token(folder: Path, tokenizer: Tokenizer) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.exists():
            token = json.loads(path.read_text()).get("unk_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                return token
    return getattr(tokenizer.model, "unk_token", None)


@lru_cache(maxsize=32)
def vocabulary(folder: Path) -> Vocabulary:
    """The vocabulary of a model folder, read once per folder."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    unk = _unk_token(folder, tokenizer)
    unk_id = tokenizer.token_to_id(unk) if unk else None
    return Vocabulary(tokenizer, unk_id, bool(getattr(tokenizer.model, "continuing_subword_prefix", None)))


@dataclass(slots=True)
class Token:
    """One non-special token: its text, label scores, character span and position (pre-entity)."""

    word: str
    scores: np.ndarray
    start: int
    end: int
    index: int
    is_subword: bool


@dataclass(slots=True)
class Entity:
    """A token (aggregation none, with its index) or a word or group of them."""

    entity: str
    score: float
    word: str
    start: int
    end: int
    index: int | None = None


def tokens_of(text: str, ids, scores: np.ndarray, offsets, special, vocab: Vocabulary) -> list[Token]:
    """The pipeline's gather_pre_entities: special and padding tokens dropped."""
    tokens = []
    ids, offsets, special = ids.tolist(), offsets.tolist(), special.tolist()  # Python ints: faster per token
    for idx, token_scores in enumerate(scores):
        if special[idx]:
            continue
        token_id = ids[idx]
        word = vocab.token(token_id)
        start, end = offsets[idx]
        word_ref = text[start:end]
        if vocab.word_aware:
            is_subword = len(word) != len(word_ref)
        else:
            is_subword = start > 0 and " " not in text[start - 1 : start + 1]
        if token_id == vocab.unk_id:
            word, is_subword = word_ref, False
        tokens.append(Token(word, token_scores, start, end, idx, is_subword))
    return tokens


def _labelled(scores: np.ndarray, labels: tuple[str, ...]) -> tuple[str, float]:
    idx = int(scores.argmax())
    return labels[idx], float(scores[idx])


def word_scores(words: list[list[Token]], strategy: str) -> list[np.ndarray]:
    """The pipeline's aggregate_word, per word: the scores that label it (its first token's, its
    most confident token's, or its tokens' nan-mean; the means of a text in one numpy call)."""
    if strategy == "first":
        return [group[0].scores for group in words]
    if strategy == "max":
        return [max(group, key=lambda t: t.scores.max()).scores for group in words]
    matrix = np.stack([t.scores for group in words for t in group])
    if np.isnan(matrix).any():
        starts = np.cumsum([0, *(len(g) for g in words)])
        return [np.nanmean(matrix[a:b], axis=0) for a, b in pairwise(starts)]
    counts = np.array([len(g) for g in words])
    sums = np.add.reduceat(matrix, np.concatenate(([0], np.cumsum(counts)[:-1])), axis=0)
    return list(sums / counts[:, None].astype(matrix.dtype))


def word_entities(tokens: list[Token], strategy: str, labels: tuple[str, ...], vocab: Vocabulary) -> list[Entity]:
    """The pipeline's aggregate_words: a word is a token and the subwords after it; it gets one label."""
    words: list[list[Token]] = []
    for token in tokens:
        if words and token.is_subword:
            words[-1].append(token)
        else:
            words.append([token])
    if not words:
        return []
    return [
        Entity(*_labelled(scores, labels), vocab.join([t.word for t in group]), group[0].start, group[-1].end)
        for group, scores in zip(words, word_scores(words, strategy), strict=True)
    ]


def _tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _nanmean(values: list[float]) -> float:
    """np.nanmean of a few floats without numpy's per-call cost (one per entity group)."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")


def _group(members: list[Entity], vocab: Vocabulary) -> Entity:
    score = _nanmean([m.score for m in members])
    word = vocab.join([m.word for m in members])
    return Entity(members[0].entity.split("-", 1)[-1], score, word, members[0].start, members[-1].end)


def group_entities(entities: list[Entity], vocab: Vocabulary) -> list[Entity]:
    """The pipeline's group_entities: neighbours of one tag join unless the next one begins (B-)."""
    groups: list[Entity] = []
    members: list[Entity] = []
    for entity in entities:
        bi, tag = _tag(entity.entity)
        if members and not (tag == _tag(members[-1].entity)[1] and bi != "B"):
            groups.append(_group(members, vocab))
            members = []
        members.append(entity)
    if members:
        groups.append(_group(members, vocab))
    return groups


def aggregate(tokens: list[Token], strategy: str, labels: tuple[str, ...], vocab: Vocabulary) -> list[Entity]:
    """Entities of one text before ignore_labels: tokens (none) or groups (the other strategies)."""
    if strategy in ("none", "simple"):
        entities = [Entity(*_labelled(t.scores, labels), t.word, t.start, t.end, t.index) for t in tokens]
    else:
        entities = word_entities(tokens, strategy, labels, vocab)
    return entities if strategy == "none" else group_entities(entities, vocab)


def _entity_pb(e: Entity) -> tasks_pb2.TokenEntity:
    return tasks_pb2.TokenEntity(entity=e.entity, score=e.score, index=e.index, word=e.word, start=e.start, end=e.end)


def _arrays(entry: ModelEntry, texts: list[str], outputs: dict, side: dict) -> tuple[np.ndarray, ...]:
    """(logits [n, tokens, labels] cut to the encoded length, token ids, offsets, special mask)."""
    logits = outputs.get("logits")
    missing = [name for name in SIDE if name not in side]
    if logits is None or logits.ndim != 3 or missing:
        raise MeshError(
            ErrorCode.INTERNAL, f"token-classification of {entry.id!r} lacks its logits or side tensors {missing}"
        )
    ids, offsets, special = (side[name] for name in SIDE)
    n, tokens = ids.shape
    if logits.shape[0] != n or logits.shape[1] < tokens or len(texts) != n or offsets.shape != (n, tokens, 2):
        raise MeshError(ErrorCode.INTERNAL, f"token-classification of {entry.id!r}: outputs do not match the inputs")
    return logits[:, :tokens].astype(np.float32, copy=False), ids, offsets, special


def token_classification(
    core: Postprocessor, request: postprocess_pb2.PostprocessRequest, outputs: dict, side: dict
) -> tasks_pb2.TaskResult:
    """TaskResult.entities: per input text, its entities in text order."""
    entry = core.catalog.get(request.model_id)
    if request.inputs.WhichOneof("kind") != "text":
        raise invalid("token-classification needs the request's texts", param="inputs")
    texts = list(request.inputs.text.texts)
    logits, ids, offsets, special = _arrays(entry, texts, outputs, side)
    p = request.parameters
    if (
        p.aggregation_strategy not in STRATEGIES
        and p.aggregation_strategy != tasks_pb2.AGGREGATION_STRATEGY_UNSPECIFIED
    ):
        raise invalid(f"unknown aggregation strategy {p.aggregation_strategy}", param="parameters.aggregation_strategy")
    strategy = STRATEGIES.get(p.aggregation_strategy, entry.postprocess.aggregation_strategy)
    # Empty: the model's default (["O"]); [""] keeps every label (a repeated field has no "unset").
    ignore = set(p.ignore_labels) if p.ignore_labels else set(entry.postprocess.ignore_labels)
    labels = entry.postprocess.labels or tuple(f"LABEL_{i}" for i in range(logits.shape[-1]))
    if len(labels) != logits.shape[-1]:
        raise MeshError(ErrorCode.INTERNAL, f"{entry.id!r} has {len(labels)} labels but {logits.shape[-1]} logits")
    vocab = vocabulary(core.folder(entry))
    items = []
    for row, text in enumerate(texts):
        tokens = tokens_of(text, ids[row], softmax(logits[row]), offsets[row], special[row], vocab)
        kept = [e for e in aggregate(tokens, strategy, labels, vocab) if e.entity not in ignore]
        items.append(tasks_pb2.TokenEntityList(entities=[_entity_pb(e) for e in kept]))
    return tasks_pb2.TaskResult(entities=tasks_pb2.TokenEntities(items=items))

"""Postprocessing: embeddings (L2 normalization, cosine similarities) and classification
(activation, labels, top-k; zero-shot scores from embedding similarity). Transport-neutral.

Pooling runs inside the model's batch on the inference service (only [n, dim] leaves it);
normalization runs here because it depends on the caller's `normalize` parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.catalog import Catalog, ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.common.modelstore import model_dir

ACTIVATIONS = ("softmax", "sigmoid", "none")


@dataclass(frozen=True)
class Labelled:
    """One input item's labels and scores, best first."""

    labels: list[str]
    scores: list[float]


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        return softmax(logits)
    if activation == "sigmoid":
        return sigmoid(logits)
    return logits


def ranked(scores: np.ndarray, labels: list[str] | tuple[str, ...], top_k: int | None) -> list[Labelled]:
    """Per row: labels sorted by descending score (stable for ties), cut to top_k."""
    order = np.argsort(-scores, axis=1, kind="stable")
    if top_k is not None:
        order = order[:, :top_k]
    values = np.take_along_axis(scores, order, axis=1).tolist()  # Python floats, one call for all rows
    rows = zip(order.tolist(), values, strict=True)
    return [Labelled([labels[j] for j in row], row_values) for row, row_values in rows]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class Postprocessor:
    def __init__(self, catalog: Catalog, models_dir: Path | None = None) -> None:
        self.catalog = catalog
        # The model store, for tasks whose results need the model's tokenizer (entity words, fills).
        self.models_dir = models_dir
        self._folders: dict[str, Path] = {}

    def folder(self, entry: ModelEntry) -> Path:
        """The model's folder, resolved once per model (a hub entry's is a lookup in the HF cache)."""
        folder = self._folders.get(entry.id)
        if folder is None:
            if self.models_dir is None:
                raise MeshError(ErrorCode.INTERNAL, f"postprocess has no model store for {entry.id!r}")
            folder = self._folders[entry.id] = model_dir(entry, self.models_dir)
        return folder

    def _embeddings(self, model_id: str, outputs: dict[str, np.ndarray]) -> np.ndarray:
        entry = self.catalog.get(model_id)
        spec = entry.inference.outputs[0]
        array = outputs.get(spec.name)
        if array is None or array.ndim != 2 or array.dtype != np.float32:
            raise MeshError(
                ErrorCode.INVALID_INPUT,
                f"model outputs do not match the contract of {model_id!r}: expected FP32 [n, dim] '{spec.name}'",
            )
        return array

    def feature_extraction(
        self, model_id: str, outputs: dict[str, np.ndarray], normalize: bool | None, dimensions: int | None = None
    ) -> np.ndarray:
        """The embeddings, L2-normalized when `normalize` (None: the catalog's setting). `dimensions`
        (Matryoshka): keep the first n, then normalize unless `normalize` is false, as
        SentenceTransformer(truncate_dim=n).encode(normalize_embeddings=True) does."""
        vectors = self._embeddings(model_id, outputs)
        if dimensions is not None:
            if not 1 <= dimensions <= vectors.shape[1]:
                raise invalid(f"`dimensions` must be in [1, {vectors.shape[1]}] for {model_id}", param="dimensions")
            vectors = np.ascontiguousarray(vectors[:, :dimensions])
            normalize = normalize is not False
        elif normalize is None:
            normalize = self.catalog.get(model_id).postprocess.normalize
        return l2_normalize(vectors).astype(np.float32, copy=False) if normalize else vectors

    def sentence_similarity(self, model_id: str, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """Row 0 is the source sentence; returns cosine(source, row i) for the other rows."""
        vectors = l2_normalize(self._embeddings(model_id, outputs))
        if vectors.shape[0] < 2:
            raise MeshError(ErrorCode.INVALID_INPUT, "sentence-similarity needs a source and at least one sentence")
        return vectors[1:] @ vectors[0]

    def _logits(self, model_id: str, outputs: dict[str, np.ndarray]):
        entry = self.catalog.get(model_id)
        spec = entry.inference.outputs[0]
        array = outputs.get(spec.name)
        labels = entry.postprocess.labels
        if array is None or array.ndim != 2 or array.shape[1] != len(labels):
            raise MeshError(
                ErrorCode.INVALID_INPUT,
                f"model outputs do not match the contract of {model_id!r}: expected [n, {len(labels)}] '{spec.name}'",
            )
        return entry, array.astype(np.float64)

    def classify(
        self, model_id: str, outputs: dict[str, np.ndarray], *, top_k: int | None, activation: str | None
    ) -> list[Labelled]:
        """text- and image-classification: activation over the logits, labels, top-k."""
        entry, logits = self._logits(model_id, outputs)
        if top_k is not None and top_k < 1:
            raise invalid("`top_k` must be at least 1", param="parameters.top_k")
        top_k = top_k if top_k is not None else entry.postprocess.top_k
        return ranked(activate(logits, activation or entry.postprocess.activation), entry.postprocess.labels, top_k)

    def zero_shot(
        self, model_id: str, outputs: dict[str, np.ndarray], labels: list[str], *, multi_label: bool
    ) -> list[Labelled]:
        """Rows come as (text, hypothesis per label) per input text (see preprocess). Single-label:
        softmax(cosine / T) across the labels; multi-label: sigmoid((cosine - threshold) / T) each."""
        entry = self.catalog.get(model_id)
        vectors = l2_normalize(self._embeddings(model_id, outputs).astype(np.float64))
        group = 1 + len(labels)
        if not labels or vectors.shape[0] % group:
            raise MeshError(ErrorCode.INVALID_INPUT, "zero-shot outputs do not match the candidate labels")
        grouped = vectors.reshape(-1, group, vectors.shape[1])
        cosine = np.einsum("nd,nld->nl", grouped[:, 0], grouped[:, 1:])
        spec = entry.postprocess.zero_shot
        if multi_label:
            scores = sigmoid((cosine - spec.multi_label_threshold) / spec.temperature)
        else:
            scores = softmax(cosine / spec.temperature)
        return ranked(scores, labels, None)

"""Embedding postprocessing: L2 normalization and cosine similarities. Transport-neutral.

Pooling runs inside the model's batch on the inference service (only [n, dim] leaves it);
normalization runs here because it depends on the caller's `normalize` parameter.
"""

from __future__ import annotations

import numpy as np

from services.common.catalog import Catalog
from services.common.errors import ErrorCode, MeshError


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class Postprocessor:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

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

    def feature_extraction(self, model_id: str, outputs: dict[str, np.ndarray], normalize: bool | None) -> np.ndarray:
        vectors = self._embeddings(model_id, outputs)
        if normalize is None:
            normalize = self.catalog.get(model_id).postprocess.normalize
        return l2_normalize(vectors).astype(np.float32, copy=False) if normalize else vectors

    def sentence_similarity(self, model_id: str, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """Row 0 is the source sentence; returns cosine(source, row i) for the other rows."""
        vectors = l2_normalize(self._embeddings(model_id, outputs))
        if vectors.shape[0] < 2:
            raise MeshError(ErrorCode.INVALID_INPUT, "sentence-similarity needs a source and at least one sentence")
        return vectors[1:] @ vectors[0]

"""Model runtimes: load a model folder, run one padded batch. No gRPC, no asyncio.

A runtime's `execute()` takes a dict of named numpy input arrays whose first dimension is the batch
and returns a dict of named output arrays with the same batch dimension. The same classes run in
the embedded inference server and inside Triton's Python backend, so one model definition serves
both backends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np

log = logging.getLogger(__name__)

_threads_lock = threading.Lock()


def set_torch_threads(threads: int) -> None:
    """Intra-op threads for this process (torch's setting is process-wide)."""
    import torch

    with _threads_lock:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def pad_and_stack(arrays: list[np.ndarray], pad_value: int | float) -> np.ndarray:
    """Concatenate along the batch axis, padding every other axis to the largest size."""
    if len(arrays) == 1:
        return arrays[0]
    target = tuple(max(a.shape[d] for a in arrays) for d in range(1, arrays[0].ndim))
    if all(a.shape[1:] == target for a in arrays):
        return np.concatenate(arrays, axis=0)
    out = np.full((sum(a.shape[0] for a in arrays), *target), pad_value, dtype=arrays[0].dtype)
    row = 0
    for a in arrays:
        out[(slice(row, row + a.shape[0]), *(slice(0, n) for n in a.shape[1:]))] = a
        row += a.shape[0]
    return out


def _writable(array: np.ndarray) -> np.ndarray:
    """torch.from_numpy needs a writable array; one decoded straight from request bytes is not."""
    array = np.ascontiguousarray(array, dtype=np.int64)
    return array if array.flags.writeable else array.copy()


class Runtime:
    """Interface of a runtime: inputs and outputs are named numpy arrays, batch first."""

    # Value used to pad each variable-length input when requests are batched together.
    pad_values: ClassVar[dict[str, int | float]] = {}

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise ValueError when one request's inputs would break the model. Called per request,
        before batching, so that one bad request cannot fail a batch of good ones."""

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class SentenceEmbeddingRuntime(Runtime):
    """A BERT-style encoder followed by attention-masked mean pooling (sentence-transformers'
    Pooling module). Pooling happens here, inside the batch, so only [batch, dim] FP32 leaves the
    inference service instead of [batch, tokens, dim]; L2 normalization is left to postprocess,
    where the caller's `normalize` parameter decides it.
    """

    pad_values: ClassVar[dict[str, int | float]] = {"input_ids": 0, "attention_mask": 0}

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModel

        self._torch = torch
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_tokens = int(self.model.config.max_position_embeddings)

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if ids.shape[-1] == 0:
            raise ValueError("input 'input_ids' has no tokens")
        if ids.shape[-1] > self.max_tokens:
            raise ValueError(f"input 'input_ids' has {ids.shape[-1]} tokens; the model takes at most {self.max_tokens}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"input 'input_ids' holds token ids outside [0, {self.vocab_size})")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("input 'attention_mask' must hold only 0 and 1")

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            ids = torch.from_numpy(_writable(inputs["input_ids"]))
            mask = torch.from_numpy(_writable(inputs["attention_mask"]))
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * weights).sum(dim=1)
            counts = weights.sum(dim=1).clamp(min=1e-9)
            return {"embedding": (summed / counts).to(torch.float32).numpy()}


RUNTIMES: dict[str, Callable[[Path], Runtime]] = {
    "sentence_embedding": SentenceEmbeddingRuntime,
}


def load_runtime(kind: str, model_dir: Path) -> Runtime:
    try:
        factory = RUNTIMES[kind]
    except KeyError:
        raise ValueError(f"unknown runtime {kind!r}; known: {', '.join(RUNTIMES)}") from None
    return factory(model_dir)

"""Every users' text folder whose runtime may run a batch in length-sorted chunks (catalog
`chunk_rows`): a batch of rows of very different lengths gives, row for row, what the whole batch
gives: pooled embeddings, sequence logits, and per-token logits at every attended position (last-token
pooling, CLS and max pooling, RoBERTa's pad-numbered positions, question-answering windows)."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.catalog import CHUNKED_RUNTIMES
from services.inference.runtime import TOKEN_EMBEDDINGS, load_runtime
from services.models.from_folder import entry_from_folder
from tests.usermodels.factory import all_builders, built

ROWS, TOKENS, CHUNK = 11, 40, 4


def _batch(runtime, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Right-padded rows of random lengths (one of a single token), ids past the special tokens,
    padding with the model's own pad id."""
    pad = int(runtime.pad_values.get("input_ids", 0))
    ids = rng.integers(5, min(runtime.vocab_size, 1000), (ROWS, TOKENS)).astype(np.int64)
    ids[ids == pad] = 5 if pad != 5 else 6
    mask = np.ones_like(ids)
    for row, length in enumerate([1, *rng.integers(2, TOKENS + 1, ROWS - 1)]):
        ids[row, length:] = pad
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("model_id", sorted(all_builders()))
def test_chunks_give_each_row_what_the_whole_batch_gives(model_id):
    folder = built(model_id, all_builders()[model_id])
    kind = entry_from_folder(folder, model_id=model_id).inference.runtime
    if kind not in CHUNKED_RUNTIMES:
        pytest.skip(f"{kind} batches run whole")
    runtime = load_runtime(kind, folder)
    batch = _batch(runtime, np.random.default_rng(3))
    whole = runtime.execute(batch)
    runtime.chunk_rows = CHUNK
    chunked = runtime.execute(batch)
    assert set(chunked) == set(whole)
    attended = batch["attention_mask"].astype(bool)
    per_token = {TOKEN_EMBEDDINGS, *(runtime.output_names if getattr(runtime, "per_token", False) else ())}
    for name, want in whole.items():
        got = chunked[name]
        assert got.shape == want.shape and got.dtype == want.dtype
        if name in per_token:
            got, want = got[attended], want[attended]
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3, err_msg=f"{model_id}: {name}")

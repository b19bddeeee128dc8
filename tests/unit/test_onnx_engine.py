"""The onnx runtime engine: its outputs equal the torch runtime's (1e-5 cosine), whole or in
length-sorted chunks, its export is cached and reused, and the catalog accepts it only for the
runtimes it can export."""

from __future__ import annotations

import os

import numpy as np
import pytest

from services.common import catalog as catalog_module
from services.common.catalog import CHUNK_ROWS_PER_THREAD, InferenceSpec, ModelEntry
from services.common.triton_repository import model_config
from services.inference.onnx_engine import ONNX_RUNTIMES, cache_key
from services.inference.runtime import RuntimeOptions, load_runtime
from tests.helpers import MODEL_ID

CLASSIFIER_ID = "meshserve/sentiment-minilm"


def _batch(rng: np.random.Generator, rows: int, tokens: int, *, types: bool = False) -> dict[str, np.ndarray]:
    """Random token ids, each row padded at the end to a random length of its own."""
    ids = rng.integers(1000, 20000, (rows, tokens)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(rows):
        length = int(rng.integers(1, tokens + 1))
        mask[row, length:] = 0
        ids[row, length:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if types:
        batch["token_type_ids"] = (rng.random(ids.shape) < 0.5).astype(np.int64) * mask
    return batch


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.fixture(scope="module")
def engines(models_dir, catalog, tmp_path_factory):
    """Torch and ONNX runtimes of the embedder and the classifier; the ONNX ones cache in a tmp folder."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    pairs = {}
    for model_id in (MODEL_ID, CLASSIFIER_ID):
        entry = catalog.get(model_id)
        folder = entry.store_dir(models_dir) / "model"
        kind = entry.inference.runtime
        pairs[model_id] = (
            load_runtime(kind, folder),
            load_runtime(kind, folder, RuntimeOptions("onnx", 1, cache)),
            load_runtime(kind, folder, RuntimeOptions("onnx", 1, cache, chunk_rows=4)),
        )
    return pairs, cache


@pytest.mark.parametrize("model_id", [MODEL_ID, CLASSIFIER_ID])
@pytest.mark.parametrize(("rows", "tokens", "types"), [(1, 1, False), (3, 17, False), (32, 64, False), (4, 9, True)])
def test_onnx_outputs_equal_torch_within_1e5_cosine(engines, model_id, rows, tokens, types):
    torch_runtime, onnx_runtime, _ = engines[0][model_id]
    batch = _batch(np.random.default_rng(rows * 100 + tokens), rows, tokens, types=types)
    # the torch runtime's graph outputs (its on-request token embeddings are not exported)
    expected = torch_runtime.execute_outputs(batch, frozenset(torch_runtime.output_names))
    got = onnx_runtime.execute(batch)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape and got[name].dtype == np.float32
        assert _min_cosine(got[name], want) >= 1 - 1e-5


@pytest.mark.parametrize("model_id", [MODEL_ID, CLASSIFIER_ID])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_chunked_runs_keep_each_row_in_its_place(engines, model_id, padding):
    """Rows of very different lengths, more than a chunk: every row's output equals the torch
    runtime's whole-batch output at its own index (left padding: no column can be cut)."""
    torch_runtime, _, chunked = engines[0][model_id]
    batch = _batch(np.random.default_rng(7), 11, 40, types=model_id == MODEL_ID)
    batch["attention_mask"][3] = 0  # a row that attends to nothing still gets its own (finite) output
    batch["attention_mask"][3, 0] = 1
    if padding == "left":
        batch = {name: tensor[:, ::-1].copy() for name, tensor in batch.items()}
    expected = torch_runtime.execute_outputs(batch, frozenset(torch_runtime.output_names))
    got = chunked.execute(batch)
    for name, want in expected.items():
        assert got[name].shape == want.shape
        assert _min_cosine(got[name], want) >= 1 - 1e-5


def test_torch_chunks_equal_the_whole_batch_token_embeddings_included(engines):
    """The torch runtime in chunks: pooled outputs and every attended token's hidden state equal the
    whole batch's; token embeddings keep the batch's width."""
    from services.inference.runtime import TOKEN_EMBEDDINGS

    torch_runtime = engines[0][MODEL_ID][0]
    batch = _batch(np.random.default_rng(11), 11, 40)
    whole = torch_runtime.execute(batch)
    torch_runtime.chunk_rows = 4
    try:
        chunked = torch_runtime.execute(batch)
    finally:
        torch_runtime.chunk_rows = 0
    assert _min_cosine(chunked["embedding"], whole["embedding"]) >= 1 - 1e-5
    tokens = chunked[TOKEN_EMBEDDINGS]
    assert tokens.shape == whole[TOKEN_EMBEDDINGS].shape
    attended = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(tokens[attended], whole[TOKEN_EMBEDDINGS][attended], atol=1e-4)


def test_encoder_entries_chunk_by_threads_unless_told(catalog):
    spec = catalog.get(MODEL_ID).inference.model_dump()
    onnx = InferenceSpec.model_validate({**spec, "runtime_engine": "onnx", "instances": 1, "threads": 2})
    assert onnx.run_chunk_rows == 2 * CHUNK_ROWS_PER_THREAD["onnx"]
    torch_spec = InferenceSpec.model_validate({**spec, "threads": 1})
    assert torch_spec.run_chunk_rows == CHUNK_ROWS_PER_THREAD["torch"]
    assert InferenceSpec.model_validate({**spec, "runtime_engine": "onnx", "chunk_rows": 0}).run_chunk_rows == 0
    lm = catalog.get("meshserve/tiny-llama-chat").inference.model_dump()
    assert InferenceSpec.model_validate(lm).run_chunk_rows == 0  # generation batches are not chunked
    with pytest.raises(ValueError, match="chunk_rows applies to the runtimes embedding_classifier, question_answering"):
        InferenceSpec.model_validate({**lm, "chunk_rows": 8})


def test_onnx_runtime_keeps_the_torch_checks(engines):
    _, onnx_runtime, _ = engines[0][MODEL_ID]
    with pytest.raises(ValueError, match="outside"):
        onnx_runtime.validate({"input_ids": np.array([[10**7]]), "attention_mask": np.array([[1]])})
    with pytest.raises(ValueError, match="no tokens"):
        onnx_runtime.validate({"input_ids": np.zeros((1, 0), np.int64), "attention_mask": np.zeros((1, 0), np.int64)})


def test_export_is_cached_and_a_second_load_reuses_it(engines, models_dir, catalog):
    pairs, cache = engines
    first = pairs[MODEL_ID][1].path
    written = first.stat().st_mtime_ns
    entry = catalog.get(MODEL_ID)
    again = load_runtime(
        entry.inference.runtime, entry.store_dir(models_dir) / "model", RuntimeOptions("onnx", 1, cache)
    )
    assert again.path == first and first.stat().st_mtime_ns == written
    assert sorted(p.suffix for p in cache.iterdir() if p.suffix == ".onnx") == [".onnx", ".onnx"]  # one per model


def test_cache_key_follows_the_folder_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"one")
    key = cache_key(tmp_path, "sentence_embedding", ("input_ids", "attention_mask"))
    assert cache_key(tmp_path, "embedding_classifier", ("input_ids", "attention_mask")) != key
    (tmp_path / "model.safetensors").write_bytes(b"other")
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    assert cache_key(tmp_path, "sentence_embedding", ("input_ids", "attention_mask")) != key


def test_catalog_onnx_runtimes_are_the_engines():
    assert catalog_module.ONNX_RUNTIMES == frozenset(ONNX_RUNTIMES)


def test_catalog_refuses_onnx_for_a_runtime_it_cannot_export(catalog):
    spec = catalog.get(MODEL_ID).inference.model_dump()
    with pytest.raises(ValueError, match="runtime_engine onnx does not run the causal_lm runtime"):
        InferenceSpec.model_validate({**spec, "runtime": "causal_lm", "runtime_engine": "onnx"})
    with pytest.raises(ValueError, match="runtime_engine"):
        InferenceSpec.model_validate({**spec, "runtime_engine": "tensorrt"})
    assert InferenceSpec.model_validate(spec).runtime_engine == "torch"


def test_triton_config_names_the_engine_and_its_cache(catalog, models_dir):
    entry = catalog.get(MODEL_ID)
    onnx_entry = ModelEntry.model_validate(
        {**entry.model_dump(), "inference": {**entry.inference.model_dump(), "runtime_engine": "onnx"}}
    )
    params = model_config(onnx_entry, models_dir, gpu=False).parameters
    assert params["MESHSERVE_ENGINE"].string_value == "onnx"
    assert params["MESHSERVE_ENGINE_CACHE"].string_value == str((entry.store_dir(models_dir) / "onnx").resolve())
    assert params["MESHSERVE_CHUNK_ROWS"].string_value == str(onnx_entry.inference.run_chunk_rows)
    assert model_config(entry, models_dir, gpu=False).parameters["MESHSERVE_ENGINE"].string_value == "torch"

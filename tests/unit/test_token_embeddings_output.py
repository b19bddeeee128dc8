"""The sentence-embedding runtime's on-request `token_embeddings` output, in process on the built
all-MiniLM-L6-v2: which runtimes and engines have it, what the served contract lists, what a batch
computes when it names outputs, and the gateway's 424 for models that cannot serve /embed_all."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from services.gateway.api.routes_tei import token_embeddings_refusal
from services.inference.repository import with_runtime_outputs
from services.inference.runtime import TOKEN_EMBEDDINGS, SentenceEmbeddingRuntime, token_embeddings_output
from tests.helpers import MODEL_ID, REPO


@pytest.fixture(scope="module")
def runtime(models_dir):
    return SentenceEmbeddingRuntime(models_dir / MODEL_ID / "model")


def batch() -> dict[str, np.ndarray]:
    ids = np.array([[101, 7592, 2088, 2003, 102], [101, 7592, 102, 0, 0]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}


def test_only_torch_sentence_embedders_have_token_embeddings(models_dir):
    folder = models_dir / MODEL_ID / "model"
    assert token_embeddings_output("sentence_embedding", "torch", folder) == {
        "name": TOKEN_EMBEDDINGS,
        "datatype": "FP32",
        "dims": (-1, 384),
    }
    assert token_embeddings_output("sentence_embedding", "onnx", folder) is None
    assert token_embeddings_output("embedding_classifier", "torch", folder) is None


def test_the_width_is_read_without_importing_transformers(models_dir):
    """Read before every Triton load of the model (the launcher, or deploy/'s auto-complete stub):
    no transformers import there."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from services.inference.runtime import token_embeddings_output
        dims = token_embeddings_output("sentence_embedding", "torch", Path({str(models_dir / MODEL_ID / "model")!r}))["dims"]
        print(list(dims), "transformers" in sys.modules, "torch" in sys.modules)
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=REPO
    )
    assert done.stdout.split() == ["[-1,", "384]", "False", "False"], done.stderr


def test_a_config_that_names_the_width_otherwise_still_gives_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "distilbert", "dim": 48, "n_layers": 1}))
    assert token_embeddings_output("sentence_embedding", "torch", tmp_path)["dims"] == (-1, 48)


def test_the_served_contract_lists_the_output_once(catalog, models_dir):
    served = with_runtime_outputs(catalog.get(MODEL_ID), models_dir)
    assert [(t.name, t.dims) for t in served.inference.outputs] == [
        ("embedding", (384,)),
        (TOKEN_EMBEDDINGS, (-1, 384)),
    ]
    assert with_runtime_outputs(served, models_dir) == served
    onnx = catalog.get(MODEL_ID).model_copy(
        update={"inference": catalog.get(MODEL_ID).inference.model_copy(update={"runtime_engine": "onnx"})}
    )
    assert [t.name for t in with_runtime_outputs(onnx, models_dir).inference.outputs] == ["embedding"]


def test_the_triton_repository_carries_the_output_so_auto_complete_can_stay_off(catalog, models_dir, tmp_path):
    """`meshserve up --backend triton` writes the runtime's outputs into config.pbtxt and starts
    Triton with --disable-auto-complete-config; a folder it cannot read stays as the catalog has it
    (its load then fails alone, in Triton, with the reason)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from services.common.catalog import Catalog
    from services.common.triton_repository import generate
    from services.inference.settings import InferenceSettings
    from services.inference.triton_launcher import command, complete

    entry = catalog.get(MODEL_ID)
    spec = entry.inference
    gone = entry.model_copy(update={"id": "test/gone", "inference": spec.model_copy(update={"name": "test--gone"})})
    repository = generate(complete(Catalog([entry, gone]), models_dir), models_dir, tmp_path / "models", gpu=False)

    def outputs(name: str) -> list[tuple[str, list[int]]]:
        config = text_format.Parse((repository / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        return [(o.name, list(o.dims)) for o in config.output]

    assert outputs(spec.name) == [("embedding", [384]), (TOKEN_EMBEDDINGS, [-1, 384])]
    assert outputs("test--gone") == [("embedding", [384])]
    assert "--disable-auto-complete-config" in command(InferenceSettings(), repository, tmp_path)


def test_a_batch_computes_only_the_outputs_named(runtime):
    feed = batch()
    assert set(runtime.execute_outputs(feed, frozenset({"embedding"}))) == {"embedding"}
    assert set(runtime.execute_outputs(feed, frozenset({TOKEN_EMBEDDINGS}))) == {TOKEN_EMBEDDINGS}
    both = runtime.execute(feed)
    assert set(both) == {"embedding", TOKEN_EMBEDDINGS} and both[TOKEN_EMBEDDINGS].shape == (2, 5, 384)
    mask = feed["attention_mask"][..., None]
    means = (both[TOKEN_EMBEDDINGS] * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(means, both["embedding"], atol=1e-5)
    np.testing.assert_allclose(runtime.execute_outputs(feed, frozenset({"embedding"}))["embedding"], both["embedding"])


def test_a_requests_rows_are_cut_to_its_own_tokens(runtime):
    outputs = runtime.execute(batch())
    own = runtime.request_outputs(outputs, {"input_ids": np.zeros((2, 3), np.int64)})
    assert own[TOKEN_EMBEDDINGS].shape == (2, 3, 384) and own["embedding"].shape == (2, 384)


def test_models_without_token_embeddings_are_refused_with_a_reason(catalog):
    entry = catalog.get(MODEL_ID)
    assert token_embeddings_refusal(entry) is None
    onnx = entry.model_copy(update={"inference": entry.inference.model_copy(update={"runtime_engine": "onnx"})})
    assert "onnx engine" in token_embeddings_refusal(onnx)
    assert "runtime embedding_classifier" in token_embeddings_refusal(catalog.get("meshserve/sentiment-minilm"))

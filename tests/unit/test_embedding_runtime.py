"""Sentence embedders served in-process (preprocess -> runtime -> postprocess, no mesh) against
SentenceTransformer(folder).encode on small sentence-transformers folders: every pooling mode,
Dense layers, prompts and Matryoshka `dimensions`."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from services.common.catalog import Catalog
from services.common.errors import MeshError
from services.common.sentence_config import MODES, pooling_modes
from services.inference.runtime import SentenceEmbeddingRuntime
from services.inference.sentence_modules import pool
from services.models.from_folder import entry_from_folder
from services.postprocess.core import Postprocessor
from services.preprocess.core import TextPreprocessor
from tests.usermodels.factory import built, corpus
from tests.usermodels.folders_embedders import FOLDERS

# Mixed lengths, so that every batch pads some rows.
TEXTS = [*corpus()[:6], "Short.", "A much longer sentence about the weather, the sea and the mountains in June."]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class Served:
    """One folder served in-process: its entry, preprocessor, runtime and postprocessor."""

    def __init__(self, model_id: str, **update) -> None:
        self.folder = built(model_id, FOLDERS[model_id])
        self.entry = entry_from_folder(self.folder, model_id=model_id)
        if update:
            pre = self.entry.preprocess.model_copy(update=update)
            self.entry = self.entry.model_copy(update={"preprocess": pre})
        self.pre = TextPreprocessor(self.entry, self.folder)
        self.runtime = SentenceEmbeddingRuntime(self.folder)
        self.post = Postprocessor(Catalog([self.entry]))

    def embed(self, texts, *, prompt_name=None, normalize=None, dimensions=None) -> np.ndarray:
        encoded = self.pre.encode(texts, truncate=True, field="inputs", prompt=self.pre.prompt(prompt_name))
        self.runtime.validate(encoded.tensors)
        outputs = self.runtime.execute(encoded.tensors)
        return self.post.feature_extraction(self.entry.id, outputs, normalize, dimensions)


def reference(folder, texts, **kw) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    load = {k: kw.pop(k) for k in ("truncate_dim", "default_prompt_name") if k in kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(str(folder), device="cpu", **load)
    return model.encode(texts, convert_to_numpy=True, **kw)


def assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert cosine(ours.astype(np.float64), theirs.astype(np.float64)).min() >= 1 - 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1), rtol=1e-4)


@pytest.mark.parametrize("model_id", sorted(FOLDERS))
def test_equals_sentence_transformers(model_id):
    served = Served(model_id)
    ours = served.embed(TEXTS)
    theirs = reference(served.folder, TEXTS)
    assert ours.shape[1] == served.entry.inference.outputs[0].dims[-1]
    assert_same(ours, theirs)
    # One text alone gives the same vector as inside a padded batch.
    assert_same(served.embed(TEXTS[-2:-1]), theirs[-2:-1])


def test_roberta_dense_shape_and_no_normalize():
    served = Served("test/roberta-max-dense")
    assert served.runtime.modes == ("max",) and len(served.runtime.dense) == 1
    assert served.entry.postprocess.normalize is False
    vectors = served.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 16)
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_last_token_reads_the_eos():
    served = Served("test/qwen2-lasttoken")
    encoded = served.pre.encode(TEXTS[:2], truncate=True, field="inputs")
    eos = served.pre.tokenizer.token_to_id("</s>")
    for ids, mask in zip(encoded.tensors["input_ids"], encoded.tensors["attention_mask"], strict=True):
        assert ids[mask.sum() - 1] == eos


@pytest.mark.parametrize("prompt_name", ["query", "document"])
def test_prompts(prompt_name):
    served = Served("test/bert-mean")
    ours = served.embed(TEXTS, prompt_name=prompt_name)
    assert_same(ours, reference(served.folder, TEXTS, prompt_name=prompt_name))
    assert not np.allclose(ours, served.embed(TEXTS))


def test_default_prompt():
    served = Served("test/bert-mean", default_prompt_name="query")
    assert_same(served.embed(TEXTS), reference(served.folder, TEXTS, default_prompt_name="query"))


def test_unknown_prompt_names_the_known_ones():
    served = Served("test/bert-mean")
    with pytest.raises(MeshError) as err:
        served.embed(TEXTS, prompt_name="search")
    assert err.value.param == "prompt_name"
    assert "'query'" in str(err.value) and "'document'" in str(err.value)


@pytest.mark.parametrize("model_id", ["test/bert-mean", "test/roberta-max-dense"])
@pytest.mark.parametrize("dims", [1, 8, 16])
def test_dimensions_match_truncate_dim(model_id, dims):
    served = Served(model_id)
    ours = served.embed(TEXTS, dimensions=dims)
    theirs = reference(served.folder, TEXTS, truncate_dim=dims, normalize_embeddings=True)
    assert_same(ours, theirs)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_dimensions_over_the_model_size():
    served = Served("test/roberta-max-dense")
    for bad in (0, 17):
        with pytest.raises(MeshError) as err:
            served.embed(TEXTS, dimensions=bad)
        assert err.value.param == "dimensions" and "16" in str(err.value)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", MODES)
def test_pooling_equals_sentence_transformers_on_both_padding_sides(mode, side):
    import torch
    from sentence_transformers.models import Pooling

    torch.manual_seed(0)
    lengths = [5, 2, 7, 1]
    hidden = torch.randn(len(lengths), 7, 8)
    mask = torch.zeros(len(lengths), 7, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    theirs = Pooling(8, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(pool((mode,), hidden, mask), theirs, rtol=1e-5, atol=1e-6)


def test_several_modes_concatenate_in_legacy_order():
    config = {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}
    assert pooling_modes(config) == ("cls", "max", "mean")
    assert pooling_modes({"pooling_mode": ["lasttoken", "mean"]}) == ("lasttoken", "mean")
    assert pooling_modes({}) == ("mean",)


def test_unsupported_modules_are_refused_at_load(tmp_path):
    folder = built("test/bge-cls", FOLDERS["test/bge-cls"])
    with pytest.raises(ValueError, match="include_prompt"):
        pooling_modes({"pooling_mode": "mean", "include_prompt": False})
    with pytest.raises(ValueError, match="Pooling mode 'median'"):
        pooling_modes({"pooling_mode": "median"})
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 9, "name": "9", "path": "9_X", "type": "sentence_transformers.models.LayerNorm"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="LayerNorm"):
        SentenceEmbeddingRuntime(tmp_path)


@pytest.mark.parametrize("prompt_name", [None, "query", "document"])
def test_admission_bound_covers_the_prompt(prompt_name):
    from services.gateway.service.bounds import text_token_bound

    served = Served("test/bert-mean", default_prompt_name="document")
    encoded = served.pre.encode(TEXTS, truncate=True, field="inputs", prompt=served.pre.prompt(prompt_name))
    bound = text_token_bound(served.entry, TEXTS, prompt_name)
    assert encoded.input_tokens <= bound
    assert text_token_bound(served.entry, TEXTS, "query") > text_token_bound(
        served.entry.model_copy(
            update={
                "preprocess": served.entry.preprocess.model_copy(update={"prompts": {}, "default_prompt_name": None})
            }
        ),
        TEXTS,
    )

"""token-classification in process: our preprocess encoder, runtime and postprocess (joined by the
wire codecs, as the gateway joins them) against transformers' own pipeline on the same folders,
for every aggregation strategy; and the batcher handing each request back its own length."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from meshserve.postprocess.v1 import postprocess_pb2
from meshserve.preprocess.v1 import preprocess_pb2
from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import Catalog, InferenceSpec, ModelEntry, PostprocessSpec, PreprocessSpec, Source
from services.common.tensors import from_pb, to_pb
from services.postprocess.core import Postprocessor
from services.postprocess.servicer import TASK_RESULTS
from services.preprocess.core import Preprocessor
from services.preprocess.servicer import TASK_ENCODERS
from tests.usermodels.factory import built
from tests.usermodels.folders_ner import FOLDERS, LABELS

TASK = "token-classification"
STRATEGIES = ("none", "simple", "first", "average", "max")
ENUM = {
    "none": tasks_pb2.AGGREGATION_STRATEGY_NONE,
    "simple": tasks_pb2.AGGREGATION_STRATEGY_SIMPLE,
    "first": tasks_pb2.AGGREGATION_STRATEGY_FIRST,
    "average": tasks_pb2.AGGREGATION_STRATEGY_AVERAGE,
    "max": tasks_pb2.AGGREGATION_STRATEGY_MAX,
}
SENTENCES = [
    "My name is Wolfgang and I live in Berlin.",
    "Café  naïve  Zoë met   Jean-Baptiste at Montréal's OpenAI HQ!!",
    "Unbelievably, the antidisestablishmentarianism debate in São Paulo (Brazil) continued.",
    "  Hugging Face Inc. is a company based in New York City.  ",
    "I ❤ 🤗 emojis ✓ and naïveté…",
]


def entry_of(model_id: str, folder: Path) -> ModelEntry:
    """The catalog entry the folder gets (the contract of layout.md), written by hand here."""
    from transformers import AutoTokenizer

    names = AutoTokenizer.from_pretrained(str(folder)).model_input_names
    inputs = [{"name": n, "datatype": "INT64", "dims": [-1]} for n in ("input_ids", "attention_mask", "token_type_ids")]
    return ModelEntry(
        id=model_id,
        tasks=(TASK,),
        source=Source(kind="path", path=str(folder)),
        preprocess=PreprocessSpec(max_length=512),
        inference=InferenceSpec(
            name=model_id.replace("/", "--"),
            runtime="token_classification",
            inputs=[i for i in inputs if i["name"] in names],
            outputs=[{"name": "logits", "datatype": "FP32", "dims": [-1, len(LABELS)]}],
        ),
        postprocess=PostprocessSpec(labels=tuple(LABELS)),
    )


class Pieces:
    """One model's preprocess, runtime and postprocess, as the mesh chains them."""

    def __init__(self, model_id: str, tmp: Path) -> None:
        from services.inference.runtime import load_runtime

        self.folder = built(model_id, FOLDERS[model_id])
        self.entry = entry_of(model_id, self.folder)
        catalog = Catalog([self.entry])
        self.pre = Preprocessor(catalog, tmp)
        self.post = Postprocessor(catalog, tmp)
        self.runtime = load_runtime("token_classification", self.folder)

    def encode(self, texts: list[str]):
        request = preprocess_pb2.PreprocessRequest(
            model_id=self.entry.id, inputs=tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=texts))
        )
        return asyncio.run(TASK_ENCODERS[TASK](self.pre, request))

    def __call__(self, texts: list[str], strategy: str, ignore: list[str] | None = None) -> list[list[dict]]:
        encoded = self.encode(texts)
        outputs = self.runtime.execute(encoded.tensors)
        params = tasks_pb2.TaskParameters(aggregation_strategy=ENUM[strategy], ignore_labels=ignore or [])
        request = postprocess_pb2.PostprocessRequest(
            model_id=self.entry.id,
            outputs=[to_pb(name, array) for name, array in outputs.items()],
            side_tensors=[to_pb(name, array) for name, array in encoded.side.items()],
            parameters=params,
            inputs=tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=texts)),
        )
        result = TASK_RESULTS[TASK](
            self.post,
            request,
            {t.name: from_pb(t) for t in request.outputs},
            {t.name: from_pb(t) for t in request.side_tensors},
        )
        return [[as_hf(e, strategy) for e in item.entities] for item in result.entities.items]


def as_hf(e: tasks_pb2.TokenEntity, strategy: str) -> dict:
    if strategy == "none":
        return {"entity": e.entity, "score": e.score, "index": e.index, "word": e.word, "start": e.start, "end": e.end}
    return {"entity_group": e.entity, "score": e.score, "word": e.word, "start": e.start, "end": e.end}


def assert_same(ours: list[list[dict]], theirs: list[list[dict]]) -> None:
    assert len(ours) == len(theirs)
    for mine, want in zip(ours, theirs, strict=True):
        assert [{k: v for k, v in e.items() if k != "score"} for e in mine] == [
            {k: (int(v) if k in ("start", "end", "index") else v) for k, v in e.items() if k != "score"} for e in want
        ]
        np.testing.assert_allclose([e["score"] for e in mine], [float(e["score"]) for e in want], atol=1e-4)


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def pieces(request, tmp_path_factory) -> Pieces:
    return Pieces(request.param, tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def pipelines(pieces):
    from transformers import pipeline

    return {s: pipeline(TASK, model=str(pieces.folder), aggregation_strategy=s) for s in STRATEGIES}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_entities_equal_the_pipelines(pieces, pipelines, strategy):
    ours = pieces(SENTENCES, strategy)
    assert_same(ours, pipelines[strategy](SENTENCES))
    assert any(len(item) > 1 for item in ours)  # the model labels some tokens other than O


def test_subwords_are_grouped_into_words(pieces, pipelines):
    """first/average/max give each word one label: no group starts inside a word."""
    text = SENTENCES[2]
    for strategy in ("first", "average", "max"):
        for e in pieces([text], strategy, ignore=[""])[0]:
            assert e["start"] == 0 or not text[e["start"] - 1].isalnum() or not text[e["start"]].isalnum()


def test_ignore_labels_empty_string_keeps_every_label(pieces, pipelines):
    ours = pieces(SENTENCES, "simple", ignore=[""])
    assert_same(ours, pipelines["simple"](SENTENCES, ignore_labels=[]))
    assert any(e["entity_group"] == "O" for item in ours for e in item)


def test_ignore_labels_are_left_out(pieces, pipelines):
    ignore = ["O", "PER", "B-LOC"]
    for strategy in ("none", "simple", "average"):
        assert_same(pieces(SENTENCES, strategy, ignore=ignore), pipelines[strategy](SENTENCES, ignore_labels=ignore))


def test_side_tensors_describe_every_token(pieces):
    encoded = pieces.encode(SENTENCES[:2])
    ids = encoded.tensors["input_ids"]
    assert encoded.side["token_ids"].tolist() == ids.tolist()
    assert encoded.side["offsets"].shape == (*ids.shape, 2)
    padding = encoded.tensors["attention_mask"] == 0
    assert padding.any() and encoded.side["special_tokens_mask"][padding].all()


def test_requests_of_different_lengths_share_a_batch_and_get_their_own_length(pieces):
    from services.inference.batcher import DynamicBatcher
    from services.inference.stats import ModelStats

    short, long = pieces.encode(["Berlin"]), pieces.encode([SENTENCES[2]])
    alone = [pieces.runtime.execute(e.tensors)["logits"] for e in (short, long)]

    async def together():
        batcher = DynamicBatcher("ner", pieces.runtime, pieces.entry.inference, ModelStats())
        try:
            futures = [batcher.submit(e.tensors, 1) for e in (short, long)]
            return await asyncio.gather(*futures)
        finally:
            await batcher.close()

    results = asyncio.run(together())
    assert {t.batch_size for _, t in results} == {2}
    for (outputs, _), solo in zip(results, alone, strict=True):
        assert outputs["logits"].shape == solo.shape
        np.testing.assert_allclose(outputs["logits"], solo, atol=1e-4)


def _parse(inputs, params: dict):
    from services.gateway.api.hf_tasks import PARSERS

    return PARSERS[TASK](None, inputs, params, {})


def test_hf_body_parses_to_typed_parameters():
    request = _parse(["a b", "c"], {"aggregation_strategy": "max", "ignore_labels": ["O", "MISC"]})
    assert not request.single and list(request.inputs.text.texts) == ["a b", "c"]
    assert request.parameters.aggregation_strategy == tasks_pb2.AGGREGATION_STRATEGY_MAX
    assert list(request.parameters.ignore_labels) == ["O", "MISC"]
    default = _parse("a b", {})
    assert default.single and default.parameters.aggregation_strategy == tasks_pb2.AGGREGATION_STRATEGY_UNSPECIFIED
    assert list(default.parameters.ignore_labels) == []
    assert list(_parse("a", {"ignore_labels": []}).parameters.ignore_labels) == [""]  # keep every label


@pytest.mark.parametrize(
    ("inputs", "params", "field"),
    [
        ("a", {"stride": 16}, "parameters.stride"),
        ("a", {"aggregation_strategy": "longest"}, "parameters.aggregation_strategy"),
        ("a", {"top_k": 1}, "parameters.top_k"),
        ([], {}, "inputs"),
        ({"text": "a"}, {}, "inputs"),
    ],
)
def test_hf_body_refusals_name_the_field(inputs, params, field):
    from services.common.errors import MeshError

    with pytest.raises(MeshError) as err:
        _parse(inputs, params)
    assert err.value.param == field


def test_hf_rendering_tokens_and_groups():
    from services.gateway.api.hf_tasks import RENDERERS

    token = tasks_pb2.TokenEntity(entity="B-PER", score=0.5, index=3, word="##x", start=1, end=2)
    group = tasks_pb2.TokenEntity(entity="PER", score=0.25, word="ab", start=0, end=2)
    result = tasks_pb2.TaskResult(
        entities=tasks_pb2.TokenEntities(
            items=[tasks_pb2.TokenEntityList(entities=[token]), tasks_pb2.TokenEntityList(entities=[group])]
        )
    )
    rendered = RENDERERS[TASK](result, _parse(["a", "b"], {}), None)
    assert rendered == [
        [{"entity": "B-PER", "score": 0.5, "index": 3, "word": "##x", "start": 1, "end": 2}],
        [{"entity_group": "PER", "score": 0.25, "word": "ab", "start": 0, "end": 2}],
    ]
    one = tasks_pb2.TaskResult(entities=tasks_pb2.TokenEntities(items=[tasks_pb2.TokenEntityList(entities=[group])]))
    assert RENDERERS[TASK](one, _parse("a", {}), None) == rendered[1]

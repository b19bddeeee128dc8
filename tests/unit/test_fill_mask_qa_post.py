"""fill-mask and question-answering in process: our preprocess encoder, runtime and postprocess
(joined by the wire codecs, as the gateway joins them) and the HF renderers, against transformers'
FillMaskPipeline and the QA pipeline's rules on the same folders; and the batcher handing each
request back its own width when requests of different lengths or mask counts share a batch."""

from __future__ import annotations

import asyncio
from functools import lru_cache

import numpy as np
import pytest
from meshserve.postprocess.v1 import postprocess_pb2
from meshserve.preprocess.v1 import preprocess_pb2
from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import Catalog
from services.common.errors import MeshError
from services.common.tensors import from_pb, to_pb
from services.gateway.api.hf_tasks import PARSERS, RENDERERS, Dialect
from services.postprocess.core import Postprocessor
from services.postprocess.servicer import TASK_RESULTS
from services.preprocess.core import Preprocessor
from services.preprocess.servicer import TASK_ENCODERS
from tests.usermodels.factory import built
from tests.usermodels.folders_mlm_qa import FOLDERS
from tests.usermodels.test_question_answering import (
    LONG_CONTEXT,
    QUESTION,
    SHORT_CONTEXT,
    assert_same_answers,
    reference_answers,
)

MLM_TEXTS = {
    "test/bert-mlm": ["Paris is the [MASK] of France.", "The [MASK] sat on the [MASK] all day.", "[MASK]"],
    "test/roberta-mlm": ["The movie was <mask>.", "I <mask> this film, it was <mask> and long.", "<mask>"],
}


class Pieces:
    """One model's preprocess, runtime and postprocess, as the mesh chains them."""

    def __init__(self, model_id: str) -> None:
        from services.inference.runtime import load_runtime
        from services.models.from_folder import entry_from_folder

        self.folder = built(model_id, FOLDERS[model_id])
        self.entry = entry_from_folder(self.folder, model_id=model_id)
        catalog = Catalog([self.entry])
        self.pre = Preprocessor(catalog, self.folder.parent)
        self.post = Postprocessor(catalog, self.folder.parent)
        self.runtime = load_runtime(self.entry.inference.runtime, self.folder)
        self.task = self.entry.tasks[0]

    def encode(self, inputs: tasks_pb2.TaskInputs, parameters: tasks_pb2.TaskParameters):
        request = preprocess_pb2.PreprocessRequest(model_id=self.entry.id, inputs=inputs, parameters=parameters)
        return asyncio.run(TASK_ENCODERS[self.task](self.pre, request))

    def infer(self, tensors: dict) -> dict:
        self.runtime.validate(tensors)
        return self.runtime.request_outputs(self.runtime.execute(tensors), tensors)

    def result(self, inputs, parameters, encoded, outputs: dict) -> tasks_pb2.TaskResult:
        request = postprocess_pb2.PostprocessRequest(
            model_id=self.entry.id, inputs=inputs, parameters=parameters,
            outputs=[to_pb(k, v) for k, v in outputs.items()], side_tensors=[to_pb(k, v) for k, v in encoded.side.items()],
        )  # fmt: skip
        outs = {t.name: from_pb(t) for t in request.outputs}
        side = {t.name: from_pb(t) for t in request.side_tensors}
        return TASK_RESULTS[self.task](self.post, request, outs, side)

    def answer(self, inputs, params: dict):
        """The HF API's JSON for a body {inputs, parameters}, through parser, mesh pieces, renderer."""
        parsed = PARSERS[self.task](self.entry, inputs, params, {})
        encoded = self.encode(parsed.inputs, parsed.parameters)
        result = self.result(parsed.inputs, parsed.parameters, encoded, self.infer(encoded.tensors))
        return RENDERERS[self.task](result, parsed, Dialect())


@lru_cache(maxsize=8)
def pieces(model_id: str) -> Pieces:
    return Pieces(model_id)


@lru_cache(maxsize=8)
def fill_mask_pipeline(model_id: str):
    from transformers import pipeline

    return pipeline("fill-mask", model=str(pieces(model_id).folder))


def assert_same_fills(got, want) -> None:
    """Same nesting, tokens, texts and sequences; scores within 1e-4."""
    got, want = (got, want) if isinstance(want[0], list) else ([got], [want])
    for g, w in zip(got, want, strict=True):
        assert [(f["token"], f["token_str"], f["sequence"]) for f in g] == [
            (f["token"], f["token_str"], f["sequence"]) for f in w
        ]
        assert np.allclose([f["score"] for f in g], [f["score"] for f in w], atol=1e-4)


@pytest.mark.parametrize("model_id", sorted(MLM_TEXTS))
@pytest.mark.parametrize("params", [{}, {"top_k": 3}, {"top_k": 12}], ids=["default", "top3", "top12"])
def test_fill_mask_equals_the_pipeline(model_id, params):
    texts = MLM_TEXTS[model_id]
    for text in texts:
        assert_same_fills(pieces(model_id).answer(text, params), fill_mask_pipeline(model_id)(text, **params))
    # several texts in one request: one answer per text, each as the pipeline gives it alone
    together = pieces(model_id).answer(texts, params)
    for got, text in zip(together, texts, strict=True):
        assert_same_fills(got, fill_mask_pipeline(model_id)(text, **params))


@pytest.mark.parametrize(
    "targets", [["capital", "city", "river"], ["city", "city", "zzqx"], "capital", ["paris"]], ids=str
)
def test_fill_mask_targets_equal_the_pipeline(targets):
    model_id, text = "test/bert-mlm", "Paris is the [MASK] of [MASK]."
    for params in ({"targets": targets}, {"targets": targets, "top_k": 2}):
        assert_same_fills(pieces(model_id).answer(text, params), fill_mask_pipeline(model_id)(text, **params))


def test_fill_mask_text_without_a_mask_is_refused_naming_the_token():
    with pytest.raises(MeshError) as err:
        pieces("test/roberta-mlm").answer(["The movie was <mask>.", "No mask here."], {})
    assert err.value.code.http_status == 400
    assert "<mask>" in err.value.message and "inputs[1]" in err.value.message


QA_CASES = {
    "default": {},
    "top3": {"top_k": 3},
    "impossible": {"handle_impossible_answer": True, "top_k": 2},
    "tokens": {"align_to_words": False, "top_k": 4},
    "short-windows": {"max_seq_len": 48, "doc_stride": 16, "top_k": 5},
    "short-answers": {"max_answer_len": 3, "top_k": 3},
}


@pytest.mark.parametrize("model_id", ["test/bert-qa", "test/distilbert-qa"])
@pytest.mark.parametrize("case", sorted(QA_CASES))
def test_question_answering_equals_the_pipeline(model_id, case):
    params, qa = QA_CASES[case], pieces(model_id)
    for context in (SHORT_CONTEXT, LONG_CONTEXT):
        got = qa.answer({"question": QUESTION, "context": context}, params)
        assert_same_answers(got, reference_answers(qa.folder, QUESTION, context, **params))


def test_question_answering_long_context_spans_windows_and_questions_keep_their_own():
    qa = pieces("test/bert-qa")
    items = [{"question": QUESTION, "context": LONG_CONTEXT}, {"question": "When?", "context": SHORT_CONTEXT}]
    parsed = PARSERS["question-answering"](qa.entry, items, {"top_k": 2}, {})
    encoded = qa.encode(parsed.inputs, parsed.parameters)
    windows = encoded.side["qa_item"].tolist()
    assert windows.count(0) > 2 and windows.count(1) == 1 and encoded.items == 2
    assert sum(encoded.item_tokens) == encoded.input_tokens == int(encoded.tensors["attention_mask"].sum())
    got = qa.answer(items, {"top_k": 2})
    for answer, item in zip(got, items, strict=True):
        assert_same_answers(answer, reference_answers(qa.folder, item["question"], item["context"], top_k=2))


def test_question_answering_parameters_are_checked():
    qa = pieces("test/bert-qa")
    body = {"question": QUESTION, "context": SHORT_CONTEXT}
    for params, field in (
        ({"max_seq_len": 4096}, "max_seq_len"), ({"doc_stride": 100, "max_seq_len": 64}, "doc_stride"),
        ({"top_k": 0}, "parameters.top_k"), ({"topk": 2}, "parameters.topk"),
    ):  # fmt: skip
        with pytest.raises(MeshError) as err:
            qa.answer(body, params)
        assert err.value.param == field, err.value.message
    with pytest.raises(MeshError):
        qa.answer({"question": "", "context": SHORT_CONTEXT}, {})


def _batched(pieces_: Pieces, requests: list[dict], max_batch_size: int = 64) -> list[dict]:
    """Outputs per request when the requests share the real DynamicBatcher's batches."""
    from services.common.catalog import InferenceSpec
    from services.inference.batcher import DynamicBatcher
    from services.inference.stats import ModelStats

    spec = InferenceSpec(**{**pieces_.entry.inference.model_dump(), "max_batch_size": max_batch_size})

    async def run():
        batcher = DynamicBatcher("m", pieces_.runtime, spec, ModelStats())
        try:
            futures = [batcher.submit(r, r["input_ids"].shape[0]) for r in requests]
            return [outputs for outputs, _ in await asyncio.gather(*futures)]
        finally:
            await batcher.close()

    return asyncio.run(run())


def test_requests_sharing_a_batch_get_their_own_widths_back():
    qa = pieces("test/bert-qa")
    short = qa.encode(*_qa_request(SHORT_CONTEXT)).tensors
    long = qa.encode(*_qa_request(LONG_CONTEXT)).tensors
    alone = [qa.infer(short), qa.infer(long)]
    for got, want in zip(_batched(qa, [short, long]), alone, strict=True):
        assert got["start_logits"].shape == want["start_logits"].shape
        assert np.allclose(got["start_logits"], want["start_logits"], atol=1e-4)
    mlm = pieces("test/bert-mlm")
    one = mlm.encode(*_texts("a [MASK] b")).tensors
    three = mlm.encode(*_texts("[MASK] and [MASK] or [MASK] again, longer", "x [MASK]")).tensors
    got = _batched(mlm, [one, three])
    assert got[0]["mask_logits"].shape[:2] == (1, 1) and got[1]["mask_logits"].shape[:2] == (2, 3)
    assert np.allclose(got[0]["mask_logits"], mlm.infer(one)["mask_logits"], atol=1e-4)


def test_chunks_of_one_fill_mask_request_have_one_width():
    """The gateway splits a request's rows into chunks of max_batch_size and joins them by bytes:
    every chunk must come back as wide as the others, whatever its own texts' masks."""
    mlm = pieces("test/bert-mlm")
    texts = ["[MASK] [MASK] [MASK] three masks", *[f"text {i} has one [MASK]" for i in range(5)]]
    encoded = mlm.encode(*_texts(*texts))
    chunks = [{k: v[i : i + 2] for k, v in encoded.tensors.items()} for i in range(0, len(texts), 2)]
    widths = {out["mask_logits"].shape[1] for out in _batched(mlm, chunks, max_batch_size=2)}
    assert widths == {3}
    joined = {"mask_logits": np.concatenate([mlm.infer(c)["mask_logits"] for c in chunks])}
    result = mlm.result(*_texts(*texts), encoded, joined)
    for item, text in zip(result.fill_mask.items, texts, strict=True):
        want = fill_mask_pipeline("test/bert-mlm")(text)
        want = want if isinstance(want[0], list) else [want]
        assert [[f.token for f in m.fills] for m in item.masks] == [[f["token"] for f in w] for w in want]


def _texts(*texts: str):
    return tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=list(texts))), tasks_pb2.TaskParameters()


def _qa_request(context: str):
    item = tasks_pb2.QuestionAnsweringInput(question=QUESTION, context=context)
    inputs = tasks_pb2.TaskInputs(question_answering=tasks_pb2.QuestionAnsweringInputs(items=[item]))
    return inputs, tasks_pb2.TaskParameters()

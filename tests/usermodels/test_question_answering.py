"""Users' *ForQuestionAnswering folders answer as transformers' QuestionAnsweringPipeline does
(answer, start, end, score 1e-4, order), through huggingface_hub's InferenceClient and gRPC Predict,
on both inference backends. Long contexts span several windows (the BERT folder has 128 positions).

transformers 5 removed the QA pipeline; `reference_answers` below is its last release's (4.57)
algorithm around transformers' own pieces that still ship: the fast tokenizer's windows, the
model run per window unpadded, `select_starts_ends` / `decode_spans`, and the tokenizer's own
Encoding.token_to_word / word_to_chars.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

pytestmark = pytest.mark.xdist_group("usermodels")

QA_MODELS = ("test/bert-qa", "test/distilbert-qa")
QUESTION = "Who wrote the report about the river?"
LONG_CONTEXT = " ".join(
    f"In {1900 + i} the engineer Anna Smith wrote a long report about the river near the old mill, "
    f"and the town council number {i} read it twice." for i in range(12)
)  # fmt: skip
SHORT_CONTEXT = "The report about the river was written by Anna Smith in 1912."


@lru_cache(maxsize=8)
def _model(folder: str):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModelForQuestionAnswering.from_pretrained(folder).eval()


def _indices(encoding, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
    """The pipeline's get_indices, on the tokenizer's own Encoding."""
    if align_to_words:
        try:
            start_word, end_word = encoding.token_to_word(s), encoding.token_to_word(e)
            return encoding.word_to_chars(start_word, sequence_index=1)[0], encoding.word_to_chars(
                end_word, sequence_index=1
            )[1]
        except Exception:
            pass
    return encoding.offsets[s][0], encoding.offsets[e][1]


def reference_answers(
    folder: Path, question: str, context: str, *, top_k: int = 1, doc_stride: int | None = None,
    max_answer_len: int = 15, max_seq_len: int | None = None, handle_impossible_answer: bool = False,
    align_to_words: bool = True,
):  # fmt: skip
    """QuestionAnsweringPipeline(question=..., context=..., **parameters) of transformers 4.57."""
    import torch
    from transformers.pipelines.document_question_answering import select_starts_ends

    tok, model = _model(str(folder))
    max_seq_len = max_seq_len or min(tok.model_max_length, 384)
    doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
    enc = tok(
        text=question, text_pair=context, padding="do_not_pad", truncation="only_second", max_length=max_seq_len,
        stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True, return_offsets_mapping=True,
    )  # fmt: skip
    answers, min_null_score = [], 1000000
    for span in range(len(enc["input_ids"])):
        p_mask = [int(s != 1) for s in enc.sequence_ids(span)]
        p_mask = [0 if t == tok.cls_token_id else m for m, t in zip(p_mask, enc["input_ids"][span], strict=True)]
        feed = {name: torch.tensor([enc[name][span]]) for name in tok.model_input_names}
        with torch.no_grad():
            out = model(**feed)
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits.numpy(), out.end_logits.numpy(), np.array([p_mask]),
            np.array([enc["attention_mask"][span]]), min_null_score,
            top_k * 2 + 10 if align_to_words else top_k, handle_impossible_answer, max_answer_len,
        )  # fmt: skip
        for s, e, score in zip(starts, ends, scores, strict=True):
            start, end = _indices(enc.encodings[span], int(s), int(e), align_to_words)
            same = next((a for a in answers if a["answer"].lower() == context[start:end].lower()), None)
            if same:
                same["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": start, "end": end, "answer": context[start:end]})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


def assert_same_answers(got, want) -> None:
    """Same nesting, spans and text; scores within 1e-4."""
    if isinstance(want, dict):
        assert isinstance(got, dict), got
        got, want = [got], [want]
    assert [(a["answer"], a["start"], a["end"]) for a in got] == [(a["answer"], a["start"], a["end"]) for a in want]
    assert np.allclose([a["score"] for a in got], [a["score"] for a in want], atol=1e-4)


CASES = {
    "default": {},
    "top3": {"top_k": 3},
    "impossible": {"handle_impossible_answer": True, "top_k": 2},
    "windows": {"max_seq_len": 64, "doc_stride": 16, "top_k": 2, "align_to_words": False},
}


@pytest.mark.parametrize("model_id", QA_MODELS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_client_question_answering_matches_pipeline(user_mesh, user_folders, hf_client, model_id, case):
    params = CASES[case]
    for context in (SHORT_CONTEXT, LONG_CONTEXT):
        got = hf_client(model_id).question_answering(question=QUESTION, context=context, **params)
        got = dict(vars(got)) if not isinstance(got, list) else [dict(vars(a)) for a in got]
        assert_same_answers(got, reference_answers(user_folders[model_id], QUESTION, context, **params))


def test_bare_url_and_refusals(user_mesh, user_folders):
    from tests.usermodels.conftest import served

    url = served(user_mesh, "test/bert-qa")
    body = {"inputs": {"question": QUESTION, "context": LONG_CONTEXT}}
    got = httpx.post(url, json=body, timeout=120)
    assert got.status_code == 200, got.text
    assert_same_answers(got.json(), reference_answers(user_folders["test/bert-qa"], QUESTION, LONG_CONTEXT))
    for bad in ({**body, "parameters": {"padding": True}}, {**body, "parameters": {"max_seq_len": 4096}},
                {"inputs": {"question": QUESTION}}):  # fmt: skip
        refused = httpx.post(url, json=bad, timeout=120)
        assert refused.status_code == 400, refused.text


def test_grpc_predict_question_answering(user_mesh, user_folders):
    items = [(QUESTION, LONG_CONTEXT), ("When was it written?", SHORT_CONTEXT)]
    inputs = tasks_pb2.TaskInputs(
        question_answering=tasks_pb2.QuestionAnsweringInputs(
            items=[tasks_pb2.QuestionAnsweringInput(question=q, context=c) for q, c in items]
        )
    )
    with grpc.insecure_channel(user_mesh.grpc_target) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Predict(
            gateway_pb2.PredictRequest(
                model_id="test/bert-qa", task=tasks_pb2.TASK_QUESTION_ANSWERING, inputs=inputs,
                parameters=tasks_pb2.TaskParameters(top_k=3),
            ),
            timeout=120,
        )  # fmt: skip
    assert reply.usage.items == 2 and reply.usage.input_tokens == sum(reply.usage.item_input_tokens)
    for answers, (question, context) in zip(reply.result.answers.items, items, strict=True):
        got = [{"score": a.score, "start": a.start, "end": a.end, "answer": a.answer} for a in answers.answers]
        assert_same_answers(
            got[0] if len(got) == 1 else got,
            reference_answers(user_folders["test/bert-qa"], question, context, top_k=3),
        )

"""Two contract gaps real huggingface_hub clients hit (issue 14), with the real client:

- HF's API answers a model URL with the task the input's shape asks for, so feature_extraction and
  sentence_similarity (and zero-shot, with its candidate labels) work on the same bare model URL,
  with the same numbers as the task's own pipeline route.
- text_generation(details=True, decoder_input_details=True) returns TGI's prefill: each prompt
  token (the tokenizer's encoding of the prompt) with its log-probability under the model, the
  first one's null; they equal transformers' own numbers on the built model.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from huggingface_hub import InferenceClient

from services.common.modelstore import model_dir
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")

LM = "meshserve/tiny-llama-chat"
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The central bank raised interest rates.",
]
PROMPT = "The json module parses"


def test_model_url_serves_feature_extraction_and_sentence_similarity_by_input_shape(mesh):
    model = InferenceClient(model=f"{mesh.url}/models/{MODEL_ID}")
    # The model URL first: its answers are computed, not the pipeline routes' cached ones.
    scores = model.sentence_similarity(SENTENCES[0], other_sentences=SENTENCES[1:])
    vectors = model.feature_extraction(SENTENCES)
    similarity = InferenceClient(model=f"{mesh.url}/models/{MODEL_ID}/pipeline/sentence-similarity")
    features = InferenceClient(model=f"{mesh.url}/models/{MODEL_ID}/pipeline/feature-extraction")
    np.testing.assert_allclose(scores, similarity.sentence_similarity(SENTENCES[0], other_sentences=SENTENCES[1:]),
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(vectors, features.feature_extraction(SENTENCES), atol=1e-6)
    assert vectors.shape == (3, 384) and len(scores) == 2 and scores[0] > scores[1]


def test_model_url_serves_zero_shot_when_candidate_labels_are_given(mesh):
    model = InferenceClient(model=f"{mesh.url}/models/{MODEL_ID}")
    pipeline = InferenceClient(model=f"{mesh.url}/models/{MODEL_ID}/pipeline/zero-shot-classification")
    text, labels = "The striker scored twice in the final.", ["sport", "finance", "cooking"]
    ours = [(e.label, e.score) for e in model.zero_shot_classification(text, candidate_labels=labels)]
    expected = [(e.label, e.score) for e in pipeline.zero_shot_classification(text, candidate_labels=labels)]
    assert [label for label, _ in ours] == [label for label, _ in expected] and ours[0][0] == "sport"
    np.testing.assert_allclose([s for _, s in ours], [s for _, s in expected], atol=1e-6)


@pytest.fixture(scope="module")
def reference_lm(catalog, models_dir):
    """The built LM and its tokenizer, loaded by transformers itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir(catalog.get(LM), models_dir)
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def test_text_generation_decoder_input_details_scores_the_prompt_like_transformers(mesh, reference_lm):
    model, tokenizer = reference_lm
    client = InferenceClient(model=f"{mesh.url}/models/{LM}")
    out = client.text_generation(PROMPT, max_new_tokens=3, details=True, decoder_input_details=True)
    ids = tokenizer.encode(PROMPT)  # what a plain prompt is tokenized to (special tokens included)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    prefill = out.details.prefill
    assert [t.id for t in prefill] == ids
    # Each token's own text, special tokens included, as TGI decodes its prefill.
    assert [t.text for t in prefill] == [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    assert prefill[0].logprob is None  # nothing precedes the first token
    expected = logprobs[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    np.testing.assert_allclose([t.logprob for t in prefill[1:]], expected.numpy(), atol=1e-4)
    # The first generated token (greedy) continues from the same forward pass.
    first = out.details.tokens[0]
    assert first.id == int(logits[-1].argmax())
    assert first.logprob == pytest.approx(float(logprobs[-1, first.id]), abs=1e-4)


def test_text_generation_details_alone_has_an_empty_prefill(mesh):
    client = InferenceClient(model=f"{mesh.url}/models/{LM}")
    assert client.text_generation(PROMPT, max_new_tokens=2, details=True).details.prefill == []


def test_decoder_input_details_on_a_stream_is_refused_as_tgi_does(mesh):
    body = {"inputs": PROMPT, "parameters": {"details": True, "decoder_input_details": True}, "stream": True}
    reply = httpx.post(f"{mesh.url}/models/{LM}", json=body, timeout=60)
    assert reply.status_code == 400 and reply.json()["error_type"] == "validation"
    assert "decoder_input_details" in reply.json()["error"]

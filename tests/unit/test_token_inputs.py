"""Token-id inputs without a mesh: preprocess's encoder of the model's own ids, its /tokenize and
/detokenize core, and the gateway's cl100k_base decoder (the tiktoken file found offline)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from services.common.errors import ErrorCode, MeshError
from services.gateway.service import tiktoken_ids
from services.preprocess import tokenization
from services.preprocess.core import Preprocessor
from tests.helpers import MODEL_ID

LM = "meshserve/tiny-llama-chat"


@pytest.fixture(scope="module")
def core(catalog, models_dir):
    return Preprocessor(catalog, models_dir)


def test_own_ids_are_padded_and_masked_as_given(core):
    pre = core.text(MODEL_ID)
    encoded = pre.encode_ids([[101, 7592, 102], [101, 102]], field="input")
    np.testing.assert_array_equal(encoded.tensors["input_ids"], [[101, 7592, 102], [101, 102, 0]])
    np.testing.assert_array_equal(encoded.tensors["attention_mask"], [[1, 1, 1], [1, 1, 0]])
    assert encoded.input_tokens == 5 and encoded.item_tokens == [3, 2]


def test_own_ids_match_the_text_encoding(core):
    pre = core.text(MODEL_ID)
    text = pre.encode(["Hello world"], truncate=False, field="input")
    ids = pre.encode_ids([text.tensors["input_ids"][0].tolist()], field="input")
    np.testing.assert_array_equal(ids.tensors["input_ids"], text.tensors["input_ids"])


@pytest.mark.parametrize(
    "items, words",
    [([[101, 30522]], "outside this model's vocabulary"), ([[1] * 257], "limit is 256"), ([[]], "no token ids")],
)
def test_bad_own_ids_are_refused(core, items, words):
    with pytest.raises(MeshError) as caught:
        core.text(MODEL_ID).encode_ids(items, field="input")
    assert words in caught.value.message and caught.value.param == "input"


def test_tokenize_and_detokenize_both_kinds_of_model(core):
    from transformers import AutoTokenizer

    lm = AutoTokenizer.from_pretrained(str(core.tokenizer_of(LM).entry.store_dir(core.models_dir) / "model"))
    got = tokenization.tokenize(core, LM, "Hello there", add_special_tokens=True)
    assert got.ids == lm.encode("Hello there") and got.max_model_len == 512
    assert tokenization.detokenize(core, LM, lm.encode("Hello there", add_special_tokens=False)) == "Hello there"
    chat = tokenization.Chat([("user", "Hi")], add_generation_prompt=True, continue_final_message=False)
    rendered = lm.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert tokenization.tokenize(core, LM, chat, False).ids == lm.encode(rendered, add_special_tokens=False)
    encoder = tokenization.tokenize(core, MODEL_ID, "a " * 400, add_special_tokens=True)
    assert len(encoder.ids) == 402 and encoder.max_model_len == 256  # never cut here
    assert tokenization.detokenize(core, MODEL_ID, encoder.ids[:3]) == "[CLS] a a"


def test_cl100k_ids_decode_to_their_text():
    enc = tiktoken_ids.encoding()
    texts = ["Hello world", "Ünïcödé, emoji 🚀 and 漢字"]
    assert tiktoken_ids.decode([enc.encode_ordinary(t) for t in texts]) == texts
    with pytest.raises(MeshError) as caught:
        tiktoken_ids.decode([[9906], [100256]])
    assert caught.value.param == "input" and "`input[1]`" in caught.value.message


def test_cl100k_ids_without_the_tiktoken_extra_name_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` now raises ImportError
    tiktoken_ids.encoding.cache_clear()
    try:
        with pytest.raises(MeshError) as caught:
            tiktoken_ids.decode([[9906]])
    finally:
        tiktoken_ids.encoding.cache_clear()
    assert caught.value.code is ErrorCode.NOT_IMPLEMENTED
    assert "meshserve[tiktoken]" in caught.value.message

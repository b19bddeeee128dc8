"""Incremental detokenization with the built LM's byte-level BPE tokenizer: streamed text equals
the whole decode, no half characters escape, stop strings are found across token boundaries."""

from __future__ import annotations

import pytest

from services.postprocess.detokenize import Detokenizers

LM = "meshserve/tiny-llama-chat"
TEXTS = [
    "Return the sum of a sequence of numbers.",
    "Ünïcödé, emoji 🚀🧪 and CJK 漢字かな survive byte-level BPE.",
    "  leading spaces,\ttabs\nand newlines\n\n",
]


@pytest.fixture(scope="module")
def detokenizers(catalog, models_dir):
    return Detokenizers(catalog, models_dir)


def stream(state, ids: list[int]) -> tuple[list[str], bool]:
    pieces, stopped = [], False
    for i, token in enumerate(ids):
        text, _, stopped = state.feed([token], last=i == len(ids) - 1)
        pieces.append(text)
        if stopped:
            break
    return pieces, stopped


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_whole_decode_and_never_splits_a_character(detokenizers, text):
    state = detokenizers.start(LM, [])
    ids = state.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 3
    pieces, stopped = stream(state, ids)
    assert not stopped
    assert "".join(pieces) == state.tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_a_stop_string_spanning_tokens_ends_the_text_before_it(detokenizers):
    text = "The quick brown fox jumps over the lazy dog."
    probe = detokenizers.start(LM, [])
    ids = probe.tokenizer.encode(text, add_special_tokens=False)
    state = detokenizers.start(LM, ["fox jum"])
    pieces, stopped = stream(state, ids)
    assert stopped and "".join(pieces) == "The quick brown "


def test_text_that_may_start_a_stop_string_is_held_then_released(detokenizers):
    state = detokenizers.start(LM, ["lazy cat"])
    ids = state.tokenizer.encode("over the lazy dog", add_special_tokens=False)
    pieces, stopped = stream(state, ids)
    assert not stopped and "".join(pieces) == "over the lazy dog"
    # Up to the token that completes "lazy", that word could still begin "lazy cat": it is held.
    k = next(i for i in range(len(ids)) if "lazy" in state.tokenizer.decode(ids[: i + 1]))
    assert "lazy" not in "".join(pieces[: k + 1])


def test_bad_stop_lists_are_refused(detokenizers):
    from services.common.errors import MeshError

    with pytest.raises(MeshError):
        detokenizers.start(LM, [""])
    with pytest.raises(MeshError):
        detokenizers.start("sentence-transformers/all-MiniLM-L6-v2", [])

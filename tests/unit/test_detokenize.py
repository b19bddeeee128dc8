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


@pytest.mark.parametrize("stops", [[], ["fox jum"], ["lazy cat", "o"]])
def test_a_chunk_of_tokens_is_fed_as_if_each_came_alone(detokenizers, stops):
    """One feed of several tokens (a coalesced response) releases the same text as feeding them one
    by one, stops at the same token, and lists each token's own text up to that token."""
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé 🚀 漢字"
    one_by_one = detokenizers.start(LM, stops)
    ids = one_by_one.tokenizer.encode(text, add_special_tokens=False)
    pieces, stopped = stream(one_by_one, ids)
    consumed = len(pieces)
    chunked = detokenizers.start(LM, stops)
    out, texts, chunk_stopped = "", [], False
    for start in range(0, len(ids), 5):
        chunk = ids[start : start + 5]
        piece, per_token, chunk_stopped = chunked.feed(chunk, last=start + 5 >= len(ids))
        out, texts = out + piece, texts + per_token
        if chunk_stopped:
            break
    assert (out, chunk_stopped) == ("".join(pieces), stopped)
    assert texts == [one_by_one.tokenizer.decode([t]) for t in ids[:consumed]]


def test_the_stream_decoder_releases_what_the_python_method_does(detokenizers):
    """The tokenizers library's DecodeStream (the fast path) against the Python prefix/read-offset
    method on the same ids: equal pieces token by token, half characters held by both."""
    fast = detokenizers.start(LM, [])
    assert fast.stream is not None
    slow = detokenizers.start(LM, [])
    slow.stream = None
    ids = fast.tokenizer.encode(TEXTS[1] + TEXTS[2], add_special_tokens=False)
    assert [fast.feed([t], last=False)[0] for t in ids] == [slow.feed([t], last=False)[0] for t in ids]

"""Incremental detokenization for streamed generation, and stop strings across token boundaries.

Text is released only when it is final: a token that ends inside a multi-byte character (byte-
level BPE yields U+FFFD until the character is complete) or a sub-word whose spacing depends on
the next token is held until it decodes cleanly — the prefix/read-offset method of TGI and vLLM:
decode a window of recent tokens twice, with and without the new ones, and release the difference.
Stop strings are matched on the decoded text, so a stop split over several tokens is still found;
text that could be the beginning of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.catalog import GENERATION_TASKS, Catalog
from services.common.errors import invalid
from services.common.modelstore import load_or_stand_in

REPLACEMENT = "\ufffd"


@dataclass
class DetokenizerState:
    """One stream's detokenization state. `stream` is the tokenizers library's DecodeStream (the
    same prefix/read-offset method, in Rust, without decoding the window twice per token); the
    offsets are kept here as well, for the final flush and for a tokenizer without one.
    `token_texts` is the model's shared cache of each token's own text."""

    tokenizer: object
    stops: tuple[str, ...]
    token_texts: dict[int, str] = field(default_factory=dict)
    backend: object = None  # the tokenizers.Tokenizer behind a fast tokenizer
    stream: object = None  # its DecodeStream
    tokens: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # all final text so far
    released: int = 0  # characters of `text` already sent
    stopped: bool = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _token_text(self, token: int) -> str:
        text = self.token_texts.get(token)
        if text is None:
            text = self.token_texts[token] = self._decode([token])
        return text

    def _add(self, token: int) -> str:
        self.tokens.append(token)
        if self.stream is not None:
            try:
                piece = self.stream.step(self.backend, token)
            except Exception:  # a prefix it cannot follow: go on with the Python method
                self.stream = None
            else:
                if piece:
                    self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
                return piece or ""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        current = self._decode(self.tokens[self.prefix_offset :])
        if len(current) > len(prefix) and not current.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return current[len(prefix) :]
        return ""

    def _held(self) -> int:
        """Characters at the end of the text that could start a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _stop_at(self) -> int:
        """Where the first stop string in the unreleased text begins, or -1."""
        start = max(0, self.released - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def prompt_texts(self, token_ids: list[int]) -> list[str]:
        """Each prompt token's own text, special tokens included (TGI's prefill tokens); the
        stream's state is untouched."""
        return [
            self.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in token_ids
        ]

    def feed(self, token_ids: list[int], *, last: bool) -> tuple[str, list[str], bool]:
        """(newly final text, each token's own text, whether a stop string was found). Tokens are
        taken one by one as if each came alone: a stop string ends the feed at the token that
        completes it, and the token texts stop there too (their count is the tokens consumed)."""
        if self.stopped:
            return "", [], True
        per_token, stop = [], -1
        for token in token_ids:
            per_token.append(self._token_text(token))
            piece = self._add(token)
            if piece:
                self.text += piece
                if self.stops and (stop := self._stop_at()) >= 0:
                    break
        if stop < 0 and last and self.read_offset < len(self.tokens):  # flush what is left, incomplete or not
            self.text += self._decode(self.tokens[self.prefix_offset :])[
                len(self._decode(self.tokens[self.prefix_offset : self.read_offset])) :
            ]
            self.prefix_offset = self.read_offset = len(self.tokens)
            stop = self._stop_at() if self.stops else -1
        if stop >= 0:
            end, self.stopped = stop, True
        else:
            end = len(self.text) if last else len(self.text) - self._held()
        end = max(end, self.released)
        out, self.released = self.text[self.released : end], end
        return out, per_token, self.stopped


class Detokenizers:
    """Tokenizers of the catalog's generation models."""

    def __init__(self, catalog: Catalog, models_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.catalog = catalog
        self._tokenizers = {
            e.id: load_or_stand_in(e, models_dir, lambda _, folder: AutoTokenizer.from_pretrained(str(folder)))
            for e in catalog.models
            if GENERATION_TASKS & set(e.tasks)
        }
        self._token_texts: dict[str, dict[int, str]] = {}  # per model: a token's own text (at most its vocabulary)

    def start(self, model_id: str, stops: list[str]) -> DetokenizerState:
        entry = self.catalog.get(model_id)
        if entry.id not in self._tokenizers:
            raise invalid(f"model {model_id!r} does not generate text", param="model")
        if any(not s for s in stops) or len(stops) > 16:
            raise invalid("`stop` takes at most 16 non-empty strings", param="stop")
        tokenizer = self._tokenizers[entry.id]
        state = DetokenizerState(tokenizer, tuple(stops), self._token_texts.setdefault(entry.id, {}))
        backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's tokenizers.Tokenizer
        if backend is not None and hasattr(backend, "decode"):
            from tokenizers.decoders import DecodeStream

            state.backend, state.stream = backend, DecodeStream(skip_special_tokens=True)
        return state

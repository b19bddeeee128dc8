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
    """One stream's detokenization state."""

    tokenizer: object
    stops: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # all final text so far
    released: int = 0  # characters of `text` already sent
    stopped: bool = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _add(self, token: int) -> str:
        self.tokens.append(token)
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

    def prompt_texts(self, token_ids: list[int]) -> list[str]:
        """Each prompt token's own text, special tokens included (TGI's prefill tokens); the
        stream's state is untouched."""
        return [
            self.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in token_ids
        ]

    def feed(self, token_ids: list[int], *, last: bool) -> tuple[str, list[str], bool]:
        """(newly final text, each token's own text, whether a stop string was found)."""
        if self.stopped:
            return "", [], True
        per_token = [self._decode([t]) for t in token_ids]
        for token in token_ids:
            self.text += self._add(token)
        if last and self.read_offset < len(self.tokens):  # flush what is left, incomplete or not
            self.text += self._decode(self.tokens[self.prefix_offset :])[
                len(self._decode(self.tokens[self.prefix_offset : self.read_offset])) :
            ]
            self.prefix_offset = self.read_offset = len(self.tokens)
        start = max(0, self.released - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
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

    def start(self, model_id: str, stops: list[str]) -> DetokenizerState:
        entry = self.catalog.get(model_id)
        if entry.id not in self._tokenizers:
            raise invalid(f"model {model_id!r} does not generate text", param="model")
        if any(not s for s in stops) or len(stops) > 16:
            raise invalid("`stop` takes at most 16 non-empty strings", param="stop")
        return DetokenizerState(self._tokenizers[entry.id], tuple(stops))

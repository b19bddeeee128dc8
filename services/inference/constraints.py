"""Structured output inside the continuous batch: a JSON schema compiled once per model and schema
text (cached) into a grammar over the model's own tokenizer, one matcher per sequence, and on
every step one token bitmask filled for the rows that have a grammar and applied to their logits
in place (rows without one are untouched). The matcher advances with each emitted token; once
the JSON value is complete the mask allows only the model's end tokens, so the sequence ends
there ("stop").

Library: xgrammar (bench/README.md, "Structured output: mask cost", has the measurements
against llguidance and why). Whitespace between JSON tokens is not free (`any_whitespace=False`):
a sampled model could otherwise spend its whole budget on spaces.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from services.common.errors import invalid

log = logging.getLogger(__name__)

PARAM = "response_format"
CACHE_SIZE = 128  # compiled grammars kept per model (LRU by schema text)


class Grammars:
    """A model's grammar compiler (made on first use: its tokenizer is read only then), the
    compiled-grammar cache, and the per-step mask over a batch."""

    def __init__(self, runtime) -> None:
        self._runtime = runtime
        self._compiler = None
        self._info = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self._bitmask = None

    def _setup(self):
        import xgrammar as xgr
        from transformers import AutoTokenizer

        runtime = self._runtime
        tokenizer = AutoTokenizer.from_pretrained(str(runtime.model_dir))
        self._info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=runtime.vocab_size, stop_token_ids=sorted(runtime.eos_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compiled(self, schema: str):
        """The compiled grammar of `schema` (JSON schema text); a schema the compiler refuses is
        INVALID_INPUT naming `response_format`."""
        with self._lock:
            found = self._cache.get(schema)
            if found is not None:
                self._cache.move_to_end(schema)
                return found
            compiler = self._compiler or self._setup()
            try:
                compiled = compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
            except (RuntimeError, ValueError, TypeError) as err:
                raise invalid(f"`{PARAM}`: the JSON schema cannot be used: {err}", param=PARAM) from None
            self._cache[schema] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return compiled

    def matcher(self, schema: str):
        """A new matcher for one sequence."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compiled(schema))

    def mask(self, logits, sequences) -> None:
        """Mask the logits rows ([batch, vocab]) of the sequences that have a grammar (in place)."""
        rows = [i for i, s in enumerate(sequences) if s.grammar is not None and not s.grammar.is_terminated()]
        if not rows:
            return
        import torch
        import xgrammar as xgr

        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < len(sequences):
            bitmask = self._bitmask = xgr.allocate_token_bitmask(max(len(sequences), 8), self._info.vocab_size)
        for i in rows:
            sequences[i].grammar.fill_next_token_bitmask(bitmask, i)
        with torch.inference_mode():  # the logits are an inference tensor
            # The masked rows as one contiguous block (the logits are a strided view of the
            # forward's output), masked, and written back.
            index = torch.tensor(rows, device=logits.device)
            block = logits.index_select(0, index)
            xgr.apply_token_bitmask_inplace(block, bitmask.index_select(0, index.cpu()).to(logits.device))
            logits.index_copy_(0, index, block)

    @staticmethod
    def advance(sequence, token: int) -> None:
        """Feed the sequence's emitted token to its matcher (an end token terminates it)."""
        matcher = sequence.grammar
        if not matcher.is_terminated() and not matcher.accept_token(token):
            log.warning("grammar refused token %d of sequence %s", token, sequence.id)

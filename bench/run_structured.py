"""Structured output: what the JSON-schema token mask costs, in one run on this machine.

  mask    per constrained-decoding library (xgrammar, llguidance; whichever is installed) and
          tokenizer (the tiny model's 4k byte-level BPE; all-MiniLM's 30k WordPiece as a size
          datapoint): the schema's compile time, then per decode step the time to fill the token
          bitmask of every row of a batch (1 and 32 rows, one matcher per row) and apply it to
          float32 logits, and to advance each matcher by one token (a random allowed one).
          Matchers that finish start over.
  decode  the tiny model's GenerationScheduler in this process (the code the inference service
          runs): 1 and 32 concurrent streams at temperature 1.0, without the schema (exactly 64
          tokens) and with it (until the JSON is complete); tokens/s = tokens / wall time, and the time spent in the mask per step.

Writes bench/results/structured.json.

    python -m bench.run_structured            # ~1-2 minutes
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from bench.common import REPO, RESULTS

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"enum": ["Paris", "Berlin", "Tokyo", "Lima"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "tags", "active"],
    "additionalProperties": False,
}
TINY = REPO / ".meshserve" / "models" / "meshserve" / "tiny-llama-chat" / "model"
MINILM = REPO / ".meshserve" / "models" / "sentence-transformers" / "all-MiniLM-L6-v2" / "model"
STEPS = 300


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stops: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int, vocab: int):
        return self.xgr.allocate_token_bitmask(rows, vocab)

    def fill_apply(self, matchers, bitmask, logits) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, m, token: int) -> bool:
        m.accept_token(token)
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, stops: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stops[0])

    def compile(self, schema: str):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        is_error, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tok)
        if is_error:
            raise ValueError(messages)
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tok, compiled)

    def bitmask(self, rows: int, vocab: int):
        return self.llg.torch.allocate_token_bitmask(rows, vocab)

    def fill_apply(self, matchers, bitmask, logits) -> None:
        for i, m in enumerate(matchers):
            self.llg.torch.fill_next_token_bitmask(m, bitmask, i)
        self.llg.torch.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, m, token: int) -> bool:
        m.consume_token(token)
        return m.is_stopped()


def mask_cost(lib_cls, folder: Path, label: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = int(AutoConfig.from_pretrained(str(folder)).vocab_size)
    stops = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id]
    started = time.perf_counter()
    lib = lib_cls(tokenizer, vocab, stops)
    setup_s = time.perf_counter() - started
    text = json.dumps(SCHEMA)
    started = time.perf_counter()
    compiled = lib.compile(text)
    result = {"library": lib.name, "tokenizer": label, "vocab": vocab, "tokenizer_setup_ms": setup_s * 1e3}
    result["compile_ms"] = (time.perf_counter() - started) * 1e3
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 32):
        matchers = [lib.matcher(compiled) for _ in range(rows)]
        bitmask = lib.bitmask(rows, vocab)
        fill, advance = [], []
        for _ in range(STEPS):
            logits = torch.rand((rows, vocab), generator=generator)
            t0 = time.perf_counter()
            lib.fill_apply(matchers, bitmask, logits)
            t1 = time.perf_counter()
            tokens = logits.argmax(dim=-1).tolist()
            t2 = time.perf_counter()
            for i, token in enumerate(tokens):
                if lib.accept(matchers[i], token):
                    matchers[i] = lib.matcher(compiled)
            advance.append(time.perf_counter() - t2)
            fill.append(t1 - t0)
        result[f"batch_{rows}"] = {
            "mask_fill_apply_us_per_step": statistics.mean(fill) * 1e6,
            "mask_fill_apply_p99_us": sorted(fill)[int(0.99 * len(fill))] * 1e6,
            "advance_us_per_step": statistics.mean(advance) * 1e6,
        }
    return result


async def decode_rate(streams: int, schema: str | None) -> dict:
    from services.common.catalog import InferenceSpec, TensorSpec
    from services.inference.generation import CausalLMRuntime, GenerationScheduler, SamplingParams

    spec = InferenceSpec(
        name="tiny", runtime="causal_lm", max_batch_size=32,
        inputs=(TensorSpec(name="input_ids", datatype="INT64", dims=(-1,)),),
        outputs=(TensorSpec(name="token_id", datatype="INT64", dims=(1,)),),
    )  # fmt: skip
    runtime = CausalLMRuntime(TINY)
    scheduler = GenerationScheduler("tiny", runtime, spec)
    spent = []
    mask = scheduler._grammars.mask

    def timed(logits, sequences):
        t0 = time.perf_counter()
        mask(logits, sequences)
        spent.append(time.perf_counter() - t0)

    scheduler._grammars.mask = timed
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe a person as JSON."}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    # Without a schema: exactly 64 tokens (the end token masked until then); with one: until the
    # JSON value is complete (the end token is forced there), at most 256.
    if schema:
        params = SamplingParams(max_new_tokens=256, temperature=1.0, json_schema=schema)
    else:
        params = SamplingParams(max_new_tokens=64, min_new_tokens=64, temperature=1.0)
    try:
        for _warm in (True, False):  # the first run warms up
            started = time.perf_counter()
            spent.clear()
            results = await asyncio.gather(
                *(_collect(scheduler.submit(prompt, SamplingParams(**{**params.__dict__, "seed": i})))
                  for i in range(streams))
            )  # fmt: skip
            wall = time.perf_counter() - started
    finally:
        await scheduler.close()
    tokens = sum(n for n, _ in results)
    valid = sum(1 for _, text in results if _valid(tokenizer, text, schema)) if schema else None
    return {
        "streams": streams, "schema": bool(schema), "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall, "mask_ms_per_step": statistics.mean(spent) * 1e3 if spent else 0.0,
        "valid_json": valid,
    }  # fmt: skip


async def _collect(stream) -> tuple[int, list[int]]:
    ids = []
    async for event in stream:
        if event.token_id is not None:
            ids.append(event.token_id)
    return len(ids), ids


def _valid(tokenizer, ids: list[int], schema: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(tokenizer.decode(ids)), json.loads(schema))
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    import torch

    torch.set_num_threads(1)
    out: dict = {"schema": SCHEMA, "steps": STEPS, "mask": [], "decode": []}
    for lib in (XGrammar, LLGuidance) if not os.environ.get("DECODE_ONLY") else ():
        for folder, label in ((TINY, "tiny-llama-chat (BPE)"), (MINILM, "all-MiniLM-L6-v2 (WordPiece)")):
            try:
                out["mask"].append(mask_cost(lib, folder, label))
            except Exception as exc:  # a library missing, or one that cannot read this tokenizer
                out["mask"].append({"library": lib.name, "tokenizer": label, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(out["mask"][-1]))
    for streams in (1, 32):
        for schema in (None, json.dumps(SCHEMA)):
            out["decode"].append(asyncio.run(decode_rate(streams, schema)))
            print(json.dumps(out["decode"][-1]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

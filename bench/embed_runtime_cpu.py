"""CPU per batch of the sentence-embedding runtime, in process: the runtime as a git revision had
it (default HEAD) against the working tree's, on the built all-MiniLM-L6-v2, interleaved rounds.

What the embedded batcher runs is `execute()` (every output: the pooled embedding and the token
embeddings, a view of the hidden states); Triton's backend runs `execute_outputs()` with the
outputs its requests named (`{"embedding"}` for the gateway's /embed). Both are timed.

    .venv/bin/python -m bench.embed_runtime_cpu [--rev HEAD] [--batches 1,8] [--calls 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from services.inference.runtime import SentenceEmbeddingRuntime, set_torch_threads

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / ".meshserve" / "models" / "sentence-transformers" / "all-MiniLM-L6-v2" / "model"
TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


def old_runtime_class(rev: str):
    """SentenceEmbeddingRuntime as services/inference/runtime.py was at `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:services/inference/runtime.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "runtime_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("runtime_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["runtime_at_rev"] = module
    spec.loader.exec_module(module)
    return module.SentenceEmbeddingRuntime


def inputs(batch: int) -> dict[str, np.ndarray]:
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    ids = np.array([tokenizer.encode(TEXT).ids] * batch, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def cpu_us(call, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_torch_threads(args.threads)
    old, new = old_runtime_class(args.rev)(MODEL), SentenceEmbeddingRuntime(MODEL)
    results = {}
    for batch in (int(b) for b in args.batches.split(",")):
        feed = inputs(batch)
        variants = {
            f"{args.rev} execute": partial(old.execute, feed),
            "new execute (all outputs)": partial(new.execute, feed),
            "new execute_outputs({embedding})": partial(new.execute_outputs, feed, frozenset({"embedding"})),
            "new execute_outputs({token_embeddings})": partial(
                new.execute_outputs, feed, frozenset({"token_embeddings"})
            ),
        }
        for call in variants.values():
            call()  # warm-up
        rounds = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, call in variants.items():
                rounds[name].append(cpu_us(call, args.calls))
        results[f"batch {batch}"] = {name: round(statistics.median(r), 1) for name, r in rounds.items()}
        pooled = new.execute(feed)
        mean = pooled["token_embeddings"].mean(axis=1)
        results[f"batch {batch}"]["max |mean(token) - pooled|"] = float(np.abs(mean - pooled["embedding"]).max())
    print(json.dumps({"cpu_us_per_batch_median": results, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()

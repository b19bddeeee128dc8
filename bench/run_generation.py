"""Generation benchmark, in one run on this machine: streaming chat through the full mesh against raw
in-process Hugging Face `generate()` of the same folder, for two causal LMs (`--model`):

  tiny  `meshserve/tiny-llama-chat` (3.95M parameters, the catalog's): the mesh's own costs dominate.
  base  a realistically sized Llama (hidden 768 x 12 layers, GQA 12/4 heads, ~107M parameters),
        random-initialised at bench time with the tiny model's tokenizer, chat template and
        generation_config (throughput does not depend on trained weights), cached under
        $MESHSERVE_HOME/bench-models/ and served with `meshserve up --model ID=FOLDER`, as users
        serve their folders. The model dominates; the target: mesh >= 0.85x raw at 32 streams.
        Its windows are 3x --seconds (a 32-stream wave of 64 tokens takes several seconds).

  raw   transformers AutoModelForCausalLM.from_pretrained(folder), 2 torch threads, `generate()`
        greedy with max_new_tokens = min_new_tokens = 64 (the length is fixed), prompts rendered with
        the folder's tokenizer and chat template; batch 1 (one fixed prompt: the single-stream rate)
        and batch 8 / 32 (left padding: the raw batched limit at that size).
  mesh  `POST /v1/chat/completions` with `stream: true`, `stream_options: {include_usage: true}`,
        max_tokens = min_tokens = 64 (vLLM's `min_tokens`: the end token is masked until then, so
        every stream makes exactly 64 tokens, like raw; `--stop-at-eos` lets the model end early,
        ~13 tokens a stream, which makes the per-request cost dominate), temperature 0.8, a
        per-request seed, closed loop at 1 / 8 / 32 streams (aiohttp, the lightest client measured
        here: it shares the 2 cores with the mesh). Tokens are counted
        from the last chunk's `usage.completion_tokens` (content chunks are not tokens one to one).
        Aggregate tokens/s = the tokens delivered inside the window / window, each stream's tokens
        spread evenly from its first to its last content chunk (32 streams that start together end
        together, so counting whole streams that end inside the window moved the rate by a wave:
        up to 1/6 of the tiny LM's 8 s window, a third of the 107M model's 24 s);
        TTFT = request start -> first non-empty `delta.content`; ITL = gaps between content chunks.
        The inference service's Prometheus metrics are read at the window's edges: the mean decode
        batch (continuous batching at work), generated tokens, server-side TTFT and time per token.

Ratios: each mesh point / raw single-stream tokens/s, and / raw batched generate() at the same batch
size. The tiny model's target: at 32 streams, aggregate tokens/s >= 5x the single-stream rate (mesh
c=32 / mesh c=1). Writes bench/results/generation.json (the tiny model's keys at the top, the base
model's under "base"; a run of one model keeps the other's from the file) and generation.png.

    python -m bench.run_generation                           # 8 s per point (BENCH_SECONDS), ~5-7 minutes
    python -m bench.run_generation --model tiny --seconds 2  # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    MAX_RAW_BATCHES,
    MAX_REQUESTS,
    REPO,
    REQUEST_TIMEOUT_S,
    RESULTS,
    SECONDS,
    WARMUP_S,
    HttpStatusError,
    Probe,
    closed_loop,
    count_noisy,
    finish_figure,
    git_info,
    machine_info,
    noisy_warning,
    percentiles_ms,
    time_batches,
    write_results,
)
from tests.helpers import Mesh, meshserve_home, start_mesh

MODEL = "meshserve/tiny-llama-chat"
BASE_MODEL = "bench/llama-base"  # the id `meshserve up --model` serves the base folder under
# The base model's shape (LlamaConfig fields); the tokenizer's ids (vocab, bos/eos/pad) come from the tiny one.
BASE_SHAPE = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
BASE_WINDOW_FACTOR = 3  # the base model's windows are this many times --seconds
BASE_TARGET_RATIO = 0.85  # base: mesh tokens/s at 32 streams >= this share of raw generate() at batch 32
BASE_TIMEOUT_S = 120.0  # a base stream's gap between chunks may reach a contended step's time
MAX_TOKENS = 64  # per request, mesh and raw
FIXED_LENGTH = True  # mesh streams send min_tokens = MAX_TOKENS (--stop-at-eos: False)
TEMPERATURE = 0.8  # mesh requests (raw is greedy with a forced length)
RAW_THREADS = 2
CONCURRENCY = (1, 8, 32)  # mesh streams; the raw batch sizes are the same
TARGET_SPEEDUP = 5.0  # c=32 aggregate tokens/s >= 5x single-stream (the target)
PREFILL_REPEATS = 30  # raw prompt forward passes timed for the TTFT floor
JSON_HEADERS = {"content-type": "application/json"}  # the mesh requests' bodies are orjson bytes
# Short chats, cycled (request i sends PROMPTS[i % len]); the raw single stream uses the first.
PROMPTS = [
    "What does the json module do?",
    "How do I read a file line by line?",
    "Explain what a generator is.",
    "What is the difference between a list and a tuple?",
    "How can I sort a dictionary by value?",
    "What does the os.path module provide?",
    "Tell me about regular expressions.",
    "How do I start a thread?",
]


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


@dataclass
class Target:
    """One model under test: its gateway id, folder, how `meshserve up` serves it, its window."""

    key: str  # "tiny" | "base"
    model: str
    folder: Path
    inference_name: str
    seconds: float
    up_args: list[str] = field(default_factory=list)  # empty: the catalog's model
    timeout_s: float = REQUEST_TIMEOUT_S
    info: dict[str, Any] = field(default_factory=dict)


# -- the base model, built at bench time -----------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def base_folder(tiny: Path) -> Path:
    """The random-initialised base Llama beside the tiny model's tokenizer files, built once per
    shape and tokenizer under $MESHSERVE_HOME/bench-models/ (a digest of both names the folder)."""
    digest = hashlib.sha256(json.dumps(BASE_SHAPE, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        digest.update((tiny / name).read_bytes())
    folder = meshserve_home() / "bench-models" / f"llama-base-{digest.hexdigest()[:12]}"
    if (folder / ".complete").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"building the base model in {folder}", flush=True)
    tiny_config = json.loads((tiny / "config.json").read_text())
    ids = {k: tiny_config[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**BASE_SHAPE, **ids)).save_pretrained(str(tmp))
    for name in TOKENIZER_FILES:
        shutil.copyfile(tiny / name, tmp / name)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def parameter_count(folder: Path) -> int:
    """Parameters stored in the folder's model.safetensors (tied embeddings once)."""
    import math

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


# -- raw in-process generate() ---------------------------------------------------------------------
def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """As preprocess does: the folder's chat template rendered, then encoded without extra specials."""
    rendered = tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)


def bench_raw(folder: Path, seconds: float) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate() warns on every call that max_new_tokens overrides max_length
    torch.set_num_threads(RAW_THREADS)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = [prompt_ids(tokenizer, p) for p in PROMPTS]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.eos_token_id

    def batch_of(size: int) -> dict[str, Any]:
        rows = [ids[k % len(ids)] for k in range(size)]
        return tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")

    def generate(inputs, *, sample: bool = False):
        with torch.inference_mode():
            return model.generate(
                **inputs,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,  # the end tokens are masked: every run makes exactly 64
                do_sample=sample,
                pad_token_id=pad_id,
            )

    # The TTFT floor: one forward of the fixed prompt (what a mesh prefill computes).
    one = torch.tensor([ids[0]])
    with torch.inference_mode():
        model(input_ids=one)
        prefill = []
        for _ in range(PREFILL_REPEATS):
            t0 = time.perf_counter()
            model(input_ids=one, use_cache=True)
            prefill.append(time.perf_counter() - t0)
    prefill_p50 = percentiles_ms(prefill)["p50_ms"]

    points = []
    for size in CONCURRENCY:
        inputs = batch_of(size)
        out = generate(inputs)
        new = out.shape[1] - inputs["input_ids"].shape[1]
        if new != MAX_TOKENS:
            raise RuntimeError(f"raw generate() made {new} tokens per row at batch {size}, expected {MAX_TOKENS}")
        if size == 1:
            greedy_text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :].tolist(), skip_special_tokens=True)
            greedy_ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        point = time_batches(
            lambda _step, inputs=inputs: generate(inputs), size, seconds=seconds, rate_key="sequences_per_s"
        )
        point["tokens_per_s"] = round(point["sequences_per_s"] * MAX_TOKENS, 1)
        point["step_ms_p50"] = round(point["p50_ms"] / MAX_TOKENS, 2)  # mean time per decode step of a generate()
        point["prompt_tokens"] = [len(ids[k % len(ids)]) for k in range(size)]
        point["padded_length"] = int(inputs["input_ids"].shape[1])
        points.append(point)
        print(
            f"  raw generate() b={size:<3} {point['tokens_per_s']:7.1f} tok/s  {point['p50_ms']} ms per generate "
            f"({point['step_ms_p50']} ms/step)  foreign {point['cpu']['foreign_cores']} cores",
            flush=True,
        )
    return {
        "how": (
            "AutoModelForCausalLM.from_pretrained(folder).generate(greedy, max_new_tokens=min_new_tokens="
            f"{MAX_TOKENS}), left padding, torch.set_num_threads({RAW_THREADS})"
        ),
        "threads": RAW_THREADS,
        "points": points,
        "single_stream_tokens_per_s": points[0]["tokens_per_s"],
        "prefill_p50_ms": prefill_p50,
        "prefill_prompt_tokens": len(ids[0]),
        "greedy_ids_prompt0": greedy_ids,
        "greedy_text_prompt0": greedy_text,
    }


# -- the inference service's Prometheus metrics ----------------------------------------------------
METRICS = (
    "meshserve_inference_decode_batch_size_sum",
    "meshserve_inference_decode_batch_size_count",
    "meshserve_inference_decode_steps_total",
    "meshserve_inference_generated_tokens_total",
    "meshserve_inference_prompt_tokens_total",
    "meshserve_inference_time_to_first_token_seconds_sum",
    "meshserve_inference_time_to_first_token_seconds_count",
    "meshserve_inference_time_per_output_token_seconds_sum",
    "meshserve_inference_time_per_output_token_seconds_count",
    "meshserve_inference_sequences_total",
    "meshserve_inference_admission_wait_seconds_sum",
    "meshserve_inference_admission_wait_seconds_count",
    "meshserve_inference_prefill_seconds_sum",
    "meshserve_inference_prefill_seconds_count",
    "meshserve_inference_decode_step_seconds_sum",
    "meshserve_inference_decode_step_seconds_count",
)
# Histograms whose buckets are kept too: their p50 / p99 in the window (a bucket's upper bound).
BUCKETED = ("meshserve_inference_time_to_first_token_seconds", "meshserve_inference_admission_wait_seconds")


async def scrape(http, url: str, model_name: str) -> dict[str, float]:
    """The generation metrics of one model (sequences_total per reason as `..._total{reason}`)."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = await http.get(url)
    reply.raise_for_status()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.labels.get("model") != model_name:
                continue
            if sample.name in METRICS:
                key = sample.name + (f"{{{sample.labels['reason']}}}" if "reason" in sample.labels else "")
                out[key] = out.get(key, 0.0) + sample.value
            elif sample.name.endswith("_bucket") and sample.name[: -len("_bucket")] in BUCKETED:
                out[f"{sample.name}{{{sample.labels['le']}}}"] = sample.value
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, Any]:
    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def mean(prefix: str, scale: float = 1.0) -> float | None:
        count = d(prefix + "_count")
        return round(d(prefix + "_sum") / count * scale, 2) if count else None

    def quantiles(name: str) -> dict[str, float | None]:
        """p50 / p99 of a histogram's observations in the window: the upper bound of the bucket
        (cumulative counts) where the quantile falls."""
        prefix = name + "_bucket{"
        bounds = sorted((float(k[len(prefix) : -1]), d(k)) for k in after if k.startswith(prefix))
        total = bounds[-1][1] if bounds else 0
        out: dict[str, float | None] = {}
        for q in (0.5, 0.99):
            bound = next((b for b, n in bounds if total and n >= q * total), None)
            out[f"p{round(q * 100)}_ms_at_most"] = None if bound is None else round(bound * 1000, 1)
        return out

    prefix = "meshserve_inference_sequences_total{"
    reasons = {k[len(prefix) : -1]: int(d(k)) for k in sorted(set(before) | set(after)) if k.startswith(prefix)}
    return {
        "mean_decode_batch": mean("meshserve_inference_decode_batch_size"),
        "decode_steps": int(d("meshserve_inference_decode_steps_total")),
        "decode_steps_per_s": round(d("meshserve_inference_decode_steps_total") / seconds, 1),
        "generated_tokens": int(d("meshserve_inference_generated_tokens_total")),
        "generated_tokens_per_s": round(d("meshserve_inference_generated_tokens_total") / seconds, 1),
        "prompt_tokens": int(d("meshserve_inference_prompt_tokens_total")),
        "mean_ttft_ms": mean("meshserve_inference_time_to_first_token_seconds", 1000.0),
        "mean_time_per_output_token_ms": mean("meshserve_inference_time_per_output_token_seconds", 1000.0),
        "mean_admission_wait_ms": mean("meshserve_inference_admission_wait_seconds", 1000.0),
        "mean_prefill_ms": mean("meshserve_inference_prefill_seconds", 1000.0),
        "mean_decode_step_ms": mean("meshserve_inference_decode_step_seconds", 1000.0),
        # the share of the window the engine thread spent in forwards (decode steps and prefills);
        # the rest it waited for work, or did a step's bookkeeping
        "worker_busy": round(
            (d("meshserve_inference_decode_step_seconds_sum") + d("meshserve_inference_prefill_seconds_sum")) / seconds,
            3,
        ),
        "ttft_buckets": quantiles("meshserve_inference_time_to_first_token_seconds"),
        "admission_wait_buckets": quantiles("meshserve_inference_admission_wait_seconds"),
        "sequences_finished": {k: v for k, v in reasons.items() if v},
    }


class GenerationProbe(Probe):
    """Probe (ModelStatistics + CPU at the window's edges) that also scrapes the inference metrics
    and keeps each edge's time, so the streams that ended inside the window can be picked out."""

    def __init__(self, mesh: Mesh, model_name: str, http) -> None:
        super().__init__(mesh.inference_target, model_name, mesh.process.pid, mesh.service_token)
        self.http = http  # its own client: the scrape never queues behind the load
        self.url = f"http://127.0.0.1:{mesh.ports['inf_m']}/metrics"
        self.edges: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self.sample_s: list[float] = []  # how long each edge took: a starved server answers late

    async def sample(self):
        t0 = time.perf_counter()
        metrics, (stats, cpu) = await asyncio.gather(scrape(self.http, self.url, self.model_name), super().sample())
        self.metrics.append(metrics)
        self.edges.append(cpu.at)
        self.sample_s.append(round(time.perf_counter() - t0, 3))
        return stats, cpu


# -- the mesh --------------------------------------------------------------------------------------
class StreamError(Exception):
    pass


async def stream_chat(session, url: str, model: str, index: int) -> dict[str, Any]:
    """One streaming chat (an aiohttp session); returns its timings and its usage from the last chunk."""
    import orjson

    body = {
        "model": model,
        "messages": chat(PROMPTS[index % len(PROMPTS)]),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "seed": index,
    }
    if FIXED_LENGTH:
        body["min_tokens"] = MAX_TOKENS
    t0 = time.perf_counter()
    chunks: list[float] = []  # arrival of each non-empty content delta
    usage, finish, done = None, None, False
    async with session.post(url, data=orjson.dumps(body), headers=JSON_HEADERS) as reply:
        if reply.status != 200:
            raise HttpStatusError(f"{reply.status} {(await reply.read())[:120]!r}")
        async for raw_line in reply.content:  # one SSE line at a time
            if not raw_line.startswith(b"data: "):
                continue
            data = raw_line[6:].rstrip(b"\r\n")
            if data == b"[DONE]":  # read on to the body's end, as the openai client does: the
                done = True  # connection then goes back to the pool (a break would close it)
                continue
            event = orjson.loads(data)
            if "error" in event:
                raise StreamError(str(event["error"])[:160])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                if choice.get("delta", {}).get("content"):
                    chunks.append(time.perf_counter())
                finish = choice.get("finish_reason") or finish
    if not done or usage is None:
        raise StreamError(f"stream ended without {'usage' if done else '[DONE]'}")
    return {
        "end": time.perf_counter(),
        "flow": (chunks[0], chunks[-1]) if chunks else (t0, t0),  # the content chunks' first and last
        "tokens": int(usage["completion_tokens"]),
        "prompt_tokens": int(usage["prompt_tokens"]),
        "content_chunks": len(chunks),
        "ttft": chunks[0] - t0 if chunks else None,
        "gaps": np.diff(chunks).tolist() if len(chunks) > 1 else [],
        "finish_reason": finish,
    }


async def check_greedy(session, url: str, model: str, raw: dict[str, Any], tokenizer) -> dict[str, Any]:
    """One greedy mesh request for the raw single stream's prompt: its text must be the raw greedy
    text of the same length (raw forces 64 tokens; the mesh may stop at the end token)."""
    body = {"model": model, "messages": chat(PROMPTS[0]), "max_tokens": MAX_TOKENS, "temperature": 0}
    async with session.post(url, json=body) as reply:
        reply.raise_for_status()
        data = await reply.json()
    text = data["choices"][0]["message"]["content"]
    n = data["usage"]["completion_tokens"]
    expected = tokenizer.decode(raw["greedy_ids_prompt0"][:n], skip_special_tokens=True)
    return {
        "completion_tokens": n,
        "finish_reason": data["choices"][0]["finish_reason"],
        "text_equals_raw_greedy": text == expected,
        "mesh_text": text[:200],
    }


def tokens_inside(records: list[dict[str, Any]], start: float, end: float) -> float:
    """The tokens delivered between start and end: each stream's tokens spread evenly over its
    content chunks' span, the part of the span inside the window counted."""
    total = 0.0
    for r in records:
        first, last = r["flow"]
        if last > first:
            total += r["tokens"] * max(0.0, min(last, end) - max(first, start)) / (last - first)
        elif start <= first <= end:
            total += r["tokens"]
    return total


def summarize_point(point: dict[str, Any], records: list[dict[str, Any]], probe: GenerationProbe) -> None:
    """Tokens delivered inside the window (every stream's share), per-stream numbers of the streams
    that ended inside it, and the metrics' deltas."""
    start, end = probe.edges[-2], probe.edges[-1]
    window = max(end - start, 1e-9)
    inside = [r for r in records if start <= r["end"] <= end]
    tokens = sum(r["tokens"] for r in inside)
    ttft = [r["ttft"] for r in inside if r["ttft"] is not None]
    gaps = [g for r in inside for g in r["gaps"]]
    point["streams"] = len(inside)
    point["completion_tokens"] = tokens
    point["tokens_per_s"] = round(tokens_inside(records, start, end) / window, 1)
    point["tokens_per_s_streams_ended"] = round(tokens / window, 1)  # the count before 2026-12-04
    point["mean_completion_tokens"] = round(tokens / len(inside), 1) if inside else None
    point["content_chunks_per_token"] = round(sum(r["content_chunks"] for r in inside) / tokens, 3) if tokens else None
    point["finish_reasons"] = dict(Counter(r["finish_reason"] for r in inside))
    point["ttft"] = percentiles_ms(ttft)
    point["itl"] = percentiles_ms(gaps)
    point["inference_metrics"] = metrics_delta(probe.metrics[-2], probe.metrics[-1], window)
    # The window's CPU of each service per token the inference service generated in it (common.py
    # gives it per completed stream): comparable across runs on a busy machine, where tok/s is not.
    per_request, generated = point.get("cpu_us_per_request"), point["inference_metrics"]["generated_tokens"]
    point["cpu_us_per_token"] = (
        {k: round(v * point["requests"] / generated) for k, v in per_request.items()}
        if per_request and generated
        else None
    )
    point["probe_sample_s"] = probe.sample_s[-2:]
    # closed_loop's rps / p50 are per stream (request start -> [DONE]); keep them, named.
    point["stream_latency"] = {k: point.pop(k) for k in ("p50_ms", "p90_ms", "p99_ms")}
    point["streams_per_s"] = point.pop("rps")


async def bench_mesh(mesh: Mesh, raw: dict[str, Any], tokenizer, target: Target) -> dict[str, Any]:
    import aiohttp
    import httpx

    url = f"{mesh.url}/v1/chat/completions"
    # aiohttp for the load: at 32 streams httpx used ~3x its CPU per request (5.4-6.6 ms against
    # 1.8 ms), CPU the mesh then lacked (bench/README.md, 2026-12-04 run).
    connector = aiohttp.TCPConnector(limit=max(CONCURRENCY))
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=target.timeout_s)) as client,
        httpx.AsyncClient(timeout=10.0) as metrics_http,
    ):
        probe = GenerationProbe(mesh, target.inference_name, metrics_http)
        try:
            check = await check_greedy(client, url, target.model, raw, tokenizer)
            print(f"  greedy check vs raw generate(): {check}", flush=True)
            points = []
            for concurrency in CONCURRENCY:
                records: list[dict[str, Any]] = []

                async def call(index: int, records=records) -> None:
                    records.append(await stream_chat(client, url, target.model, index))

                point = await closed_loop(call, concurrency, probe, seconds=target.seconds)
                summarize_point(point, records, probe)
                m = point["inference_metrics"]
                print(
                    f"  mesh c={concurrency:<3} {point['tokens_per_s']:7.1f} tok/s ({point['streams']} streams, "
                    f"{point['mean_completion_tokens']} tok each)  TTFT p50 {point['ttft']['p50_ms']} p99 "
                    f"{point['ttft']['p99_ms']} ms  ITL p50 {point['itl']['p50_ms']} p99 {point['itl']['p99_ms']} ms  "
                    f"decode batch {m['mean_decode_batch']}  server {m['generated_tokens_per_s']} tok/s, TTFT mean "
                    f"{m['mean_ttft_ms']} p99<={m['ttft_buckets']['p99_ms_at_most']} ms (admission wait mean "
                    f"{m['mean_admission_wait_ms']} p99<={m['admission_wait_buckets']['p99_ms_at_most']}, prefill "
                    f"{m['mean_prefill_ms']} ms)  CPU us/token {point['cpu_us_per_token']}  "
                    f"errors {point['errors']}  client/server/foreign {point['cpu']['client_cores']}/"
                    f"{point['cpu']['server_cores']}/{point['cpu']['foreign_cores']} cores",
                    flush=True,
                )
                points.append(point)
        finally:
            await probe.close()
    return {"check_vs_raw": check, "points": points}


def add_ratios(points: list[dict[str, Any]], raw: dict[str, Any], key: str = "tiny") -> dict[str, Any]:
    single = raw["single_stream_tokens_per_s"]
    by_batch = {p["batch"]: p["tokens_per_s"] for p in raw["points"]}
    for p in points:
        p["ratio_to_raw_single_stream"] = round(p["tokens_per_s"] / single, 3)
        p["ratio_to_raw_batched_same_size"] = round(p["tokens_per_s"] / by_batch[p["concurrency"]], 3)
    c1 = next(p for p in points if p["concurrency"] == 1)
    c32 = next(p for p in points if p["concurrency"] == max(CONCURRENCY))
    speedup = round(c32["tokens_per_s"] / c1["tokens_per_s"], 2) if c1["tokens_per_s"] else None
    if key == "base":
        ratio = c32["ratio_to_raw_batched_same_size"]
        return {
            "target": f"at {c32['concurrency']} streams, mesh tokens/s >= {BASE_TARGET_RATIO:g}x raw generate() "
            f"at batch {c32['concurrency']}",
            "mesh_c1_tokens_per_s": c1["tokens_per_s"],
            f"mesh_c{c32['concurrency']}_tokens_per_s": c32["tokens_per_s"],
            "ratio_to_raw_batched": ratio,
            "met": ratio >= BASE_TARGET_RATIO,
            "speedup": speedup,
            "raw_batched_speedup_same_sizes": round(by_batch[c32["concurrency"]] / by_batch[1], 2),
        }
    return {
        "target": f"at {c32['concurrency']} streams, aggregate tokens/s >= {TARGET_SPEEDUP:g}x the single-stream rate",
        "mesh_c1_tokens_per_s": c1["tokens_per_s"],
        f"mesh_c{c32['concurrency']}_tokens_per_s": c32["tokens_per_s"],
        "speedup": speedup,
        "met": bool(speedup is not None and speedup >= TARGET_SPEEDUP),
        "raw_batched_speedup_same_sizes": round(by_batch[c32["concurrency"]] / by_batch[1], 2),
    }


# -- output ----------------------------------------------------------------------------------------
def parts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The measured models of a result: the tiny one (top-level keys), then the base one."""
    return [p for p in (result if "raw" in result else None, result.get("base")) if p]


def noisy_points(result: dict[str, Any]) -> int:
    return count_noisy(p for part in parts(result) for p in [*part["raw"]["points"], *part["mesh"]["points"]])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = parts(result)
    fig, axes = plt.subplots(len(rows), 3, figsize=(17, 5.2 * len(rows)), squeeze=False)
    for part, row in zip(rows, axes, strict=True):
        plot_row(part, row)
    models = " and ".join(part["model"] for part in rows)
    finish_figure(fig, path, result, f"{models} streaming chat through the mesh", f", max_tokens {MAX_TOKENS}")


def plot_row(part: dict[str, Any], axes) -> None:
    raw, points, target = part["raw"], part["mesh"]["points"], part["target"]
    xs = [p["concurrency"] for p in points]
    tput, ttft, itl = axes

    tput.plot(xs, [p["tokens_per_s"] for p in points], marker="o", label="full mesh, streaming chat (client count)")
    tput.plot(
        xs,
        [p["inference_metrics"]["generated_tokens_per_s"] for p in points],
        marker="x",
        linestyle=":",
        label="full mesh, inference metrics (generated_tokens_total)",
    )
    tput.plot(
        [p["batch"] for p in raw["points"]],
        [p["tokens_per_s"] for p in raw["points"]],
        marker="s",
        color="black",
        label=f"raw generate() at batch = streams ({raw['threads']} thr)",
    )
    tput.axhline(
        raw["single_stream_tokens_per_s"], color="grey", linestyle="--",
        label=f"raw single stream {raw['single_stream_tokens_per_s']:.0f} tok/s",
    )  # fmt: skip
    if "ratio_to_raw_batched" in target:  # base: a share of raw batched generate() at 32
        tput.axhline(
            BASE_TARGET_RATIO * raw["points"][-1]["tokens_per_s"], color="tab:red", linestyle="-.",
            label=f"target {BASE_TARGET_RATIO:g}x raw b={raw['points'][-1]['batch']} "
            f"({'met' if target['met'] else 'not met'}: {target['ratio_to_raw_batched']}x)",
        )  # fmt: skip
    else:
        tput.axhline(
            TARGET_SPEEDUP * target["mesh_c1_tokens_per_s"], color="tab:red", linestyle="-.",
            label=f"target {TARGET_SPEEDUP:g}x mesh c=1 ({'met' if target['met'] else 'not met'}: {target['speedup']}x)",
        )  # fmt: skip
    for p in points:
        note = "" if p["streams"] else "\nno stream ended in the window"
        tput.annotate(
            f"{p['ratio_to_raw_batched_same_size']:.2f}x raw b={p['concurrency']}\n"
            f"decode batch {p['inference_metrics']['mean_decode_batch']}{note}",
            (p["concurrency"], p["tokens_per_s"]), fontsize=7, textcoords="offset points", xytext=(5, -18),
        )  # fmt: skip
    tput.set_ylabel("aggregate tokens/s")
    tput.set_title(f"{part['model']}: throughput", fontsize=10)

    ttft.plot(xs, [p["ttft"]["p50_ms"] for p in points], marker="o", label="mesh TTFT p50 (client)")
    ttft.plot(xs, [p["ttft"]["p99_ms"] for p in points], marker="s", linestyle=":", label="mesh TTFT p99 (client)")
    ttft.plot(
        xs, [p["inference_metrics"]["mean_ttft_ms"] for p in points], marker="x", linestyle="--",
        label="inference service mean TTFT (metrics)",
    )  # fmt: skip
    ttft.axhline(
        raw["prefill_p50_ms"], color="black", linestyle="--", label=f"raw prefill p50 {raw['prefill_p50_ms']} ms"
    )
    ttft.set_ylabel("time to first token, ms (log)")
    ttft.set_yscale("log")
    ttft.set_title("time to first token", fontsize=10)

    itl.plot(xs, [p["itl"]["p50_ms"] for p in points], marker="o", label="mesh ITL p50 (content chunks)")
    itl.plot(xs, [p["itl"]["p99_ms"] for p in points], marker="s", linestyle=":", label="mesh ITL p99")
    itl.plot(
        [p["batch"] for p in raw["points"]], [p["step_ms_p50"] for p in raw["points"]], marker="s", color="black",
        label="raw generate() ms/step at batch = streams",
    )  # fmt: skip
    itl.set_ylabel("inter-token latency, ms (log)")
    itl.set_yscale("log")
    itl.set_title("inter-token latency", fontsize=10)

    for ax in (tput, ttft, itl):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent streams (closed loop) / raw batch size")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)


def summary(result: dict[str, Any]) -> str:
    lines = [line for part in parts(result) for line in part_summary(part)]
    if result["noisy_points"]:
        lines.append(noisy_warning(result["noisy_points"]))
    return "\n".join(lines)


def part_summary(part: dict[str, Any]) -> list[str]:
    raw, mesh, target = part["raw"], part["mesh"], part["target"]
    size = f" ({part['parameters'] / 1e6:.0f}M parameters)" if "parameters" in part else ""
    lines = [
        f"**{part['model']}**{size}: raw single stream {raw['single_stream_tokens_per_s']} tok/s, raw prefill p50 "
        f"{raw['prefill_p50_ms']} ms; greedy mesh text equals raw generate(): "
        f"{mesh['check_vs_raw']['text_equals_raw_greedy']}",
        "",
        "| path | streams / batch | tok/s | x raw single | x raw batched same size | TTFT p50 / p99 ms | "
        "ITL p50 / p99 ms | decode batch | tok/stream | errors | client / server / foreign cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    single = raw["single_stream_tokens_per_s"]
    for p in raw["points"]:
        lines.append(
            f"| raw generate() | b={p['batch']} | {p['tokens_per_s']} | {p['tokens_per_s'] / single:.2f} | 1 | - | "
            f"{p['step_ms_p50']} / - (per step) | {p['batch']} | {MAX_TOKENS} | 0 | "
            f"{p['cpu']['client_cores']} / - / {p['cpu']['foreign_cores']} |"
        )
    for p in mesh["points"]:
        cpu, m = p["cpu"], p["inference_metrics"]
        lines.append(
            f"| mesh SSE | c={p['concurrency']} | {p['tokens_per_s']} | {p['ratio_to_raw_single_stream']:.2f} | "
            f"{p['ratio_to_raw_batched_same_size']:.2f} | {p['ttft']['p50_ms']} / {p['ttft']['p99_ms']} | "
            f"{p['itl']['p50_ms']} / {p['itl']['p99_ms']} | {m['mean_decode_batch']} | "
            f"{p['mean_completion_tokens']} | {p['errors']} | "
            f"{cpu['client_cores']} / {cpu['server_cores']} / {cpu['foreign_cores']} |"
        )
    got = target.get("ratio_to_raw_batched", target["speedup"])
    lines += [
        "",
        f"**Target** ({target['target']}): {got}x -> **{'met' if target['met'] else 'not met'}** "
        f"(raw generate() at the same sizes: {target['raw_batched_speedup_same_sizes']}x)",
        "",
    ]
    return lines


def targets(which: str, seconds: float) -> list[Target]:
    """The models `--model` asks for; the base folder is built (or reused) here."""
    from services.common.catalog import Catalog
    from services.common.modelstore import model_dir

    entry = Catalog.load(REPO / "catalog.yaml").get(MODEL)
    tiny = model_dir(entry, meshserve_home() / "models")
    if not tiny.is_dir():
        sys.exit(f"{tiny} is missing; run `meshserve models build` (or `make models`) first")
    out = []
    if which in ("tiny", "all"):
        info = {
            "catalog_inference": entry.inference.model_dump(mode="json"),
            "catalog_preprocess": entry.preprocess.model_dump(mode="json"),
        }
        out.append(Target("tiny", MODEL, tiny, entry.inference.name, seconds, info=info))
    if which in ("base", "all"):
        from services.models.user_models import infer

        folder = base_folder(tiny)
        spec = f"{BASE_MODEL}={folder}"
        base = infer(spec).entry
        info = {
            "folder": str(folder),
            "parameters": parameter_count(folder),
            "shape": BASE_SHAPE,
            "meshserve_up": ["--model", spec],
            "catalog_inference": base.inference.model_dump(mode="json"),
        }
        window = seconds * BASE_WINDOW_FACTOR
        out.append(
            Target("base", BASE_MODEL, folder, base.inference.name, window, ["--model", spec], BASE_TIMEOUT_S, info)
        )
    return out


def measure(target: Target) -> dict[str, Any]:
    """Raw generate(), then the mesh serving the target alone; the model's part of the result."""
    from transformers import AutoTokenizer

    print(
        f"{target.model}: raw in-process generate() ({target.folder}), {WARMUP_S:g}+{target.seconds:g} s per batch size",
        flush=True,
    )
    raw = bench_raw(target.folder, target.seconds)  # before the mesh starts: nothing else of ours on the cores
    tokenizer = AutoTokenizer.from_pretrained(str(target.folder))
    print(f"starting the mesh (meshserve up {' '.join(target.up_args)})", flush=True)
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as tmp:
        home = None
        if target.up_args:  # a home of its own: `up --model` writes home/run/catalog.yaml
            home = Path(tmp) / "home"
            home.mkdir()
        t0 = time.perf_counter()
        mesh = start_mesh(Path(tmp), home=home, args=target.up_args)
        startup_s = round(time.perf_counter() - t0, 1)
        try:
            import uvloop  # the client shares the cores with the mesh, so its per-request CPU matters

            mesh_result = uvloop.run(bench_mesh(mesh, raw, tokenizer, target))
        except BaseException:
            print(f"mesh log tail:\n{mesh.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            mesh.stop()
    return {
        "model": target.model,
        "inference_model": target.inference_name,
        "window_s": target.seconds,
        "mesh_startup_s": startup_s,
        **target.info,
        "raw": raw,
        "mesh": mesh_result,
        "target": add_ratios(mesh_result["points"], raw, target.key),
    }


def config(seconds: float) -> dict[str, Any]:
    return {
        "bench_seconds": seconds,
        "base_window_factor": BASE_WINDOW_FACTOR,
        "warmup_s": WARMUP_S,
        "max_requests_per_point": MAX_REQUESTS,
        "max_raw_batches_per_point": MAX_RAW_BATCHES,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "concurrency": list(CONCURRENCY),
        "max_tokens": MAX_TOKENS,
        "min_tokens": MAX_TOKENS if FIXED_LENGTH else None,
        "temperature": TEMPERATURE,
        "seed": "the request's index in its point",
        "prompts": PROMPTS,
        "client": f"aiohttp, pool of {max(CONCURRENCY)} keep-alive connections, uvloop",
        "tokens_per_s": "tokens delivered inside the window / window: each stream's usage.completion_tokens spread "
        "evenly from its first to its last content chunk ('tokens_per_s_streams_ended': the streams ending inside "
        "the window, the count before 2026-12-04)",
        "ttft": "request start -> first chunk with non-empty delta.content",
        "itl": "gaps between consecutive content chunks of a stream (all streams pooled)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_generation", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=SECONDS, help="measurement window per point (default %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for generation.{json,png} (default bench/results)"
    )
    parser.add_argument(
        "--model", choices=("tiny", "base", "all"), default="all", help="which model(s) to measure (default all)"
    )
    parser.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="let mesh streams end at the model's end token instead of making exactly max_tokens",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    global FIXED_LENGTH
    FIXED_LENGTH = not args.stop_at_eos
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    started = time.time()
    info = machine_info()
    measured = {target.key: measure(target) for target in targets(args.model, args.seconds)}
    previous = args.out / "generation.json"  # a run of one model keeps the other's numbers
    result: dict[str, Any] = json.loads(previous.read_text()) if args.model != "all" and previous.is_file() else {}
    result.pop("noisy_points", None)
    if "tiny" in measured:
        tiny = measured["tiny"]
        config_tiny = {**config(args.seconds), "mesh_startup_s": tiny.pop("mesh_startup_s")}
        config_tiny.update({k: tiny.pop(k) for k in ("catalog_inference", "catalog_preprocess")})
        tiny.pop("window_s")
        result = {k: v for k, v in result.items() if k not in ("raw", "mesh", "target")}
        result.update({"benchmark": "generation", **tiny, "config": config_tiny})
    if "base" in measured:
        result["base"] = measured["base"]
    result.update(
        {
            "endpoint": "POST /v1/chat/completions (stream, stream_options.include_usage)",
            "models_this_run": list(measured),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "git": git_info(),
            "machine": info,
        }
    )
    result.setdefault("config", config(args.seconds))
    result["noisy_points"] = noisy_points(result)
    write_results(args.out, "generation", result, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

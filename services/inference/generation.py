"""Token generation with continuous batching: every running sequence advances one token per
decode step, new sequences join between steps and finished or cancelled ones leave. Works with
any Hugging Face causal LM whose forward takes `attention_mask`, `position_ids` and a
`DynamicCache` (Llama, Qwen2, Mistral, GPT-2 families).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from services.common.catalog import InferenceSpec
from services.common.errors import ErrorCode, MeshError, invalid
from services.common.generation_contract import FinishReason, InputTensor, RequestParameter
from services.common.metrics import LATENCY_BUCKETS
from services.inference.constraints import Grammars
from services.inference.runtime import set_torch_threads

log = logging.getLogger(__name__)

DECODE_BATCH = Histogram(
    "meshserve_inference_decode_batch_size",
    "Sequences advanced by one decode step.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64),
)
RUNNING = Gauge("meshserve_inference_running_sequences", "Sequences in the decode batch.", ["model"])
WAITING = Gauge("meshserve_inference_waiting_sequences", "Sequences waiting to join the batch.", ["model"])
TTFT = Histogram(
    "meshserve_inference_time_to_first_token_seconds", "Submission to first token.", ["model"], buckets=LATENCY_BUCKETS
)
TPOT = Histogram(
    "meshserve_inference_time_per_output_token_seconds",
    "Mean time between a sequence's tokens after the first.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
ADMISSION_WAIT = Histogram(
    "meshserve_inference_admission_wait_seconds",
    "Submission to the start of the sequence's prefill (the decode step in flight, a free batch slot).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
PREFILL = Histogram(
    "meshserve_inference_prefill_seconds",
    "One prefill forward (all the sequences joining at once) with its sampling.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
DECODE = Histogram(
    "meshserve_inference_decode_step_seconds",
    "One decode step's forward pass with its sampling, in the model's engine thread (the rest of a"
    " step's wall time is prefills and the step's bookkeeping).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter("meshserve_inference_generated_tokens_total", "Tokens generated.", ["model"])
PROMPT_TOKENS = Counter("meshserve_inference_prompt_tokens_total", "Prompt tokens prefilled.", ["model"])
FINISHED = Counter("meshserve_inference_sequences_total", "Finished sequences by reason.", ["model", "reason"])
DECODE_STEPS = Counter("meshserve_inference_decode_steps_total", "Decode steps run.", ["model"])
CANCEL_TAIL = Histogram(
    "meshserve_inference_tokens_after_cancel",
    "Tokens a sequence still generated after its cancellation reached the scheduler.",
    ["model"],
    buckets=(0, 1, 2, 4, 8, 16),
)


class Unset(float):
    """A sampling default the request left unset: it acts as its value, and the model's
    generation_config.json may replace it (`SamplingParams.with_defaults`)."""


class UnsetInt(int):
    """`Unset` for an integer parameter."""


# The sampling parameters a folder's generation_config.json may give defaults for (vLLM's choice).
DEFAULTABLE = ("temperature", "top_p", "top_k", "repetition_penalty")
MAX_LOGIT_BIAS = 300  # OpenAI's limit on `logit_bias` entries
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on `top_logprobs`
# A lone newcomer to a batch of at least HOLD_MIN_RUNNING sequences waits up to HOLD_STEPS decode
# steps for another to prefill with (GenerationScheduler._holds).
HOLD_MIN_RUNNING = 16
HOLD_STEPS = 2
# A forward pass over fewer (tokens x parameters) than this runs on one intra-op thread, whatever
# the entry's `threads`: its matrix products are too small to share, and the second thread's
# barrier waits on a core that the gateway and postprocess need for the same tokens. #18, the 4M
# tiny LM at one stream: ITL p50 5.3 / 5.4 ms on one thread against 7.0 / 8.0 on two; at 32
# streams two threads were as fast or faster, and a 107M model's single row is past the bound.
SOLO_WORK = 64_000_000


def parse_logit_bias(value) -> tuple[tuple[int, float], ...]:
    """The `logit_bias` request parameter (a JSON object text, token id -> bias) as (id, bias)
    pairs sorted by id; a malformed value is the caller's error."""
    import json

    key = RequestParameter.LOGIT_BIAS
    try:
        data = json.loads(value) if isinstance(value, str) else None
        if not isinstance(data, dict):
            raise ValueError("not an object")
        pairs = [(int(token), float(bias)) for token, bias in data.items() if not isinstance(bias, bool)]
    except (ValueError, TypeError):
        raise invalid(f"`{key}` must be a JSON object of token id -> number", param=key) from None
    if len(pairs) != len(data):
        raise invalid(f"`{key}` values must be numbers", param=key)
    return tuple(sorted(pairs))


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0  # the end and stop tokens are masked until this many were generated
    temperature: float = Unset(1.0)
    top_p: float = Unset(1.0)
    top_k: int = UnsetInt(0)
    seed: int | None = None
    repetition_penalty: float = Unset(1.0)
    stop_token_ids: tuple[int, ...] = ()
    # Also score the prompt (TGI's decoder_input_details): before its first token the sequence
    # emits each prompt token's log-probability, read from the prefill's own forward pass.
    prompt_logprobs: bool = False
    min_p: float = 0.0  # drop tokens below min_p times the most likely one's probability; 0 is off
    ignore_eos: bool = False  # the model's end token does not end the sequence (stop_token_ids do)
    frequency_penalty: float = 0.0  # OpenAI's: minus this per earlier occurrence in the output
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token occurred in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    # Report raw log-probabilities (the model's distribution before any processing): the chosen
    # token's in TokenEvent.logprob, and the `top_logprobs` most likely tokens in TokenEvent.top.
    logprobs: bool = False
    top_logprobs: int = 0
    # Structured output: the JSON schema text the output is held to (constraints.py); "" is off.
    json_schema: str = ""

    def validate(self) -> None:
        """The ranges of generation.proto's GenerationRequestParameters; `param` names the key."""
        key = RequestParameter
        if self.max_new_tokens < 1:
            raise invalid(f"`{key.MAX_TOKENS}` must be at least 1", param=key.MAX_TOKENS)
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise invalid(f"`{key.MIN_TOKENS}` must be in [0, {key.MAX_TOKENS}]", param=key.MIN_TOKENS)
        if not 0.0 <= self.temperature <= 100.0:
            raise invalid(f"`{key.TEMPERATURE}` must be in [0, 100]", param=key.TEMPERATURE)
        if not 0.0 < self.top_p <= 1.0:
            raise invalid(f"`{key.TOP_P}` must be in (0, 1]", param=key.TOP_P)
        if self.top_k < 0:
            raise invalid(f"`{key.TOP_K}` must be >= 0", param=key.TOP_K)
        if self.repetition_penalty <= 0.0:
            raise invalid(f"`{key.REPETITION_PENALTY}` must be > 0", param=key.REPETITION_PENALTY)
        self._validate_extras()

    def _validate_extras(self) -> None:
        """The ranges of min_p, the OpenAI penalties, logit_bias and top_logprobs."""
        key = RequestParameter
        if not 0.0 <= self.min_p <= 1.0:
            raise invalid(f"`{key.MIN_P}` must be in [0, 1]", param=key.MIN_P)
        for name in (key.FREQUENCY_PENALTY, key.PRESENCE_PENALTY):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise invalid(f"`{name}` must be in [-2, 2]", param=name)
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise invalid(f"`{key.LOGIT_BIAS}` takes at most {MAX_LOGIT_BIAS} tokens", param=key.LOGIT_BIAS)
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise invalid(f"`{key.LOGIT_BIAS}` values must be in [-100, 100]", param=key.LOGIT_BIAS)
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid(f"`{key.TOP_LOGPROBS}` must be in [0, {MAX_TOP_LOGPROBS}]", param=key.TOP_LOGPROBS)

    @property
    def adjusts_logits(self) -> bool:
        """Whether the OpenAI penalties or a logit bias change this row's logits."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)

    def with_defaults(self, defaults: dict[str, float | int]) -> SamplingParams:
        """These parameters with the model's `defaults` in the fields the request left unset."""
        given = {k: v for k, v in defaults.items() if isinstance(getattr(self, k), Unset | UnsetInt)}
        return replace(self, **given) if given else self


def sampling_defaults(model_dir: Path) -> dict[str, float | int]:
    """The sampling defaults of a folder's generation_config.json (temperature, top_p, top_k,
    repetition_penalty where the file sets them, as vLLM applies them); values out of range are
    left out rather than failing every request that sets none."""
    import json

    path = model_dir / "generation_config.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    defaults: dict[str, float | int] = {}
    for name in DEFAULTABLE:
        value = data.get(name) if isinstance(data, dict) else None
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        value = int(value) if name == "top_k" else float(value)
        try:
            SamplingParams(**{name: value}).validate()
        except MeshError:
            log.warning("%s: ignoring %s=%r (out of range)", path, name, value)
            continue
        defaults[name] = value
    return defaults


@dataclass(frozen=True)
class TokenEvent:
    """One step of a sequence's output: a token, or the final event (token None) with the reason."""

    token_id: int | None
    final: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprob: float = 0.0  # log-probability of the token under the sampling distribution
    # The prompt event (token None, not final; first, and only when asked for): per prompt token
    # its log-probability given the tokens before it under the model (no sampling transform),
    # NaN for the first token, which nothing precedes.
    prompt_logprobs: tuple[float, ...] | None = None
    # With SamplingParams.top_logprobs: the most likely (token id, raw log-probability) pairs.
    top: tuple[tuple[int, float], ...] | None = None


class CausalLMRuntime:
    """A Hugging Face causal LM with the three operations continuous batching needs."""

    def __init__(self, model_dir: Path, lean: bool | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        from services.inference.runtime import torch_device

        self._torch = torch
        self.device = torch_device()
        self.model_dir = Path(model_dir)  # its tokenizer, for grammars (constraints.py)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval().to(self.device)
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        eos: set[int] = set()
        try:
            generation = GenerationConfig.from_pretrained(str(model_dir))
            ids = generation.eos_token_id
            eos.update(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        except OSError:
            pass
        if config.eos_token_id is not None:
            eos.update(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
        self.eos_token_ids = frozenset(eos)
        # Applied to requests that set none of them (GenerationScheduler.submit).
        self.sampling_defaults = sampling_defaults(Path(model_dir))
        self._keeps_logits = self.model._supports_logits_to_keep()
        # The decode step without HF's module dispatch for Llama-family models (lean_decode.py);
        # None: the HF forward. `lean` None follows the lean_decode setting.
        self.lean = _lean_decoder(self.model) if (_lean_setting() if lean is None else lean) else None

    def _last_only(self, scored: bool) -> dict[str, int]:
        """The forward's argument that computes only the last position's logits (as generate()
        asks; the LM head over every prompt position cost a third of a prefill), unless scored."""
        return {"logits_to_keep": 1} if self._keeps_logits and not scored else {}

    def prefill(self, ids: list[int], scored: bool = False):
        """(last-position logits [vocab], per-layer (k, v) of the prompt, the prompt's
        log-probabilities when `scored`, else None)."""
        torch = self._torch
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device), use_cache=True, **self._last_only(scored)
            )
            layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            scores = self.prompt_logprobs(out.logits[0], ids) if scored else None
            return out.logits[0, -1].float(), layers, scores

    def prompt_logprobs(self, logits, ids: list[int]) -> list[float]:
        """Each prompt token's log-probability given the tokens before it, from the prompt's
        logits at every position ([n, vocab]); NaN for the first token (nothing precedes it)."""
        torch = self._torch
        targets = torch.tensor(ids[1:], device=logits.device).unsqueeze(1)
        scores = torch.log_softmax(logits[:-1].float(), dim=-1).gather(1, targets).squeeze(1)
        return [float("nan"), *scores.tolist()]

    def prefill_batch(self, prompts: list[list[int]], scored: list[bool] | None = None):
        """Several prompts in one forward, left-padded: (last-position logits [k, vocab], per-layer
        (k, v) [k, heads, longest, dim], mask [k, longest], per prompt its log-probabilities if
        `scored` says so, else None); the same numbers as one at a time."""
        scored = scored or [False] * len(prompts)
        if len(prompts) == 1:
            logits, layers, scores = self.prefill(prompts[0], scored[0])
            mask = self._torch.ones((1, len(prompts[0])), dtype=self._torch.long, device=self.device)
            return logits.unsqueeze(0), layers, mask, [scores]
        torch = self._torch
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, device=self.device)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **self._last_only(any(scored)),
            )  # fmt: skip
            layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            scores = [
                self.prompt_logprobs(out.logits[row, width - len(prompt) :], prompt) if wanted else None
                for row, (prompt, wanted) in enumerate(zip(prompts, scored, strict=True))
            ]
            return out.logits[:, -1].float(), layers, mask, scores

    def decode_slots(self, tokens: list[int], slots):
        """One step for the running batch of `slots` (`_Slots`): logits [n, vocab]; the step's keys
        and values are written in place, and the slots advance."""
        mask, positions = slots.step_inputs()  # each sequence's own next position
        if self.lean is not None:
            logits = self.lean.decode(tokens, mask, positions, slots)
        else:
            logits = self.decode(tokens, mask, positions, slots.cache())
        slots.advance()
        return logits

    def decode(self, tokens: list[int], mask, positions, cache):
        """One step for a left-padded batch: logits [batch, vocab]; the step's keys and values go
        into `cache` (`_Slots.cache()`: in place, in the batch's buffers)."""
        torch = self._torch
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor(tokens, device=self.device).unsqueeze(1),
                attention_mask=mask,
                position_ids=positions.unsqueeze(1),
                past_key_values=cache,
                use_cache=True,
            )
            return out.logits[:, -1].float()


def _lean_setting() -> bool:
    from services.inference.settings import InferenceSettings

    return InferenceSettings().lean_decode


def _lean_decoder(model):
    """lean_decode.LeanDecoder for a model it recognises, else None (the HF forward)."""
    from services.inference.lean_decode import LeanDecoder

    try:
        return LeanDecoder.build(model)
    except Exception:  # an unexpected layout: the HF forward serves it
        log.warning("lean decode unavailable; using the HF forward", exc_info=True)
        return None


@functools.cache
def _slot_layer():
    """The cache layer class of `_Slots` (transformers is imported on first use)."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are a window of preallocated buffers: the forward's
        update writes its new columns in place after the window instead of concatenating (a full
        copy of the layer's cache per step)."""

        def __init__(self, keys, values, rows: int, lo: int, hi: int) -> None:
            super().__init__()
            self.buffers, self.rows, self.lo, self.hi = (keys, values), rows, lo, hi
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self.keys, self.values = keys[:rows, :, lo:hi], values[:rows, :, lo:hi]

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = self.buffers
            end = self.hi + key_states.shape[-2]
            keys[: self.rows, :, self.hi : end].copy_(key_states)
            values[: self.rows, :, self.hi : end].copy_(value_states)
            self.hi = end
            self.keys, self.values = keys[: self.rows, :, self.lo : end], values[: self.rows, :, self.lo : end]
            return self.keys, self.values

    return SlotLayer


class _Slots:
    """The running batch's KV cache, attention mask and next positions in buffers allocated once
    ([rows, kv_heads, capacity, dim] per layer, rows = the batch's maximum). The running sequences
    are rows [0, n), right-aligned on the window of columns [lo, hi): a decode step writes column
    hi in place; a newcomer's prefill cache is copied into a free row ending at hi; a leaver's row
    is refilled by the last row (one row copied, not the whole cache re-indexed); columns that
    became padding for every row leave the window (lo moves); when hi reaches the capacity the
    window moves back to column 0 (one copy per `capacity - width` steps), and the buffers double
    when the window fills more than half of them. Padding columns hold stale but finite values
    under a 0 mask."""

    def __init__(self, torch, rows: int, max_context: int) -> None:
        self.torch, self.rows, self.limit = torch, rows, 2 * (max_context + 1)
        self.n = self.lo = self.hi = self.capacity = 0
        self.keys: list = []
        self.values: list = []
        self.mask = self.positions = None

    def cache(self):
        """A DynamicCache over the window for the next step (whose update fills column hi)."""
        from transformers import DynamicCache

        cache, layer = DynamicCache(), _slot_layer()
        for keys, values in zip(self.keys, self.values, strict=True):
            cache.layers.append(layer(keys, values, self.n, self.lo, self.hi))
        return cache

    def step_inputs(self):
        """(attention mask [n, width + 1], positions [n]) of the next step, room made for column hi."""
        if self.hi >= self.capacity:
            width = self.hi - self.lo
            self._rebase(0, width + 1, grow=2 * (width + 1) > self.capacity)
        with self.torch.inference_mode():
            self.mask[: self.n, self.hi] = 1
        return self.mask[: self.n, self.lo : self.hi + 1], self.positions[: self.n]

    def advance(self) -> None:
        """After a step: its column joins the window, every row's position moves on."""
        with self.torch.inference_mode():
            self.positions[: self.n] += 1
        self.hi += 1

    def join(self, layers, mask) -> None:
        """Copy newcomers' prefill cache ([k, heads, L, dim] per layer, left-padded; mask [k, L])
        into rows [n, n + k), their last column at hi - 1."""
        torch = self.torch
        length, k = int(mask.sum(1).max()), mask.shape[0]
        if not self.keys:
            self._allocate(layers, self._capacity(length + 1))
        if self.n == 0:
            self.lo = self.hi = 0
        if self.hi < length:  # the window is shorter than the prompt: move it right
            self._rebase(self.lo + length - self.hi, length + 1)
        start, rows = self.hi - length, slice(self.n, self.n + k)
        with torch.inference_mode():
            if start < self.lo:  # the window widens left: padding for the rows already there
                self.mask[: self.n, start : self.lo] = 0
                self.lo = start
            self.mask[rows, self.lo : start] = 0
            self.mask[rows, start : self.hi] = mask[:, -length:]
            for (new_k, new_v), keys, values in zip(layers, self.keys, self.values, strict=True):
                keys[rows, :, start : self.hi] = new_k[:, :, -length:]
                values[rows, :, start : self.hi] = new_v[:, :, -length:]
            self.positions[rows] = mask.sum(1)
        self.n += k

    def remove(self, row: int) -> None:
        """Free `row`: the last row moves into it (the caller moves its sequence the same way)."""
        last = self.n - 1
        if row != last:
            lo, hi = self.lo, self.hi
            with self.torch.inference_mode():
                for buffer in (*self.keys, *self.values):
                    buffer[row, :, lo:hi] = buffer[last, :, lo:hi]
                self.mask[row, lo:hi] = self.mask[last, lo:hi]
                self.positions[row] = self.positions[last]
        self.n = last

    def trim(self) -> None:
        """Drop the leading columns that are padding for every row."""
        if self.n == 0:
            self.lo = self.hi = 0
            return
        used = self.mask[: self.n, self.lo : self.hi].any(0)
        self.lo += int(used.int().argmax())

    def _capacity(self, need: int) -> int:
        capacity = 64
        while capacity < 2 * need:
            capacity *= 2
        return max(need, min(capacity, self.limit))

    def _allocate(self, layers, capacity: int):
        """Zeroed buffers (stale padding must be finite: 0 x NaN would leak through the mask)."""
        torch, rows = self.torch, self.rows
        with torch.inference_mode():
            self.keys = [k.new_zeros((rows, k.shape[1], capacity, k.shape[3])) for k, _ in layers]
            self.values = [v.new_zeros((rows, v.shape[1], capacity, v.shape[3])) for _, v in layers]
            device = layers[0][0].device
            self.mask = torch.zeros((rows, capacity), dtype=torch.long, device=device)
            if self.positions is None:
                self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.capacity = capacity

    def _rebase(self, offset: int, need: int, grow: bool = False) -> None:
        """Move the window to start at `offset`, into larger buffers when `need` columns do not fit."""
        n, lo, hi = self.n, self.lo, self.hi
        width = hi - lo
        old = (self.keys, self.values, self.mask)
        if grow or offset + width > self.capacity or need > self.capacity:
            self._allocate(list(zip(self.keys, self.values, strict=True)), self._capacity(max(need, offset + width)))
        with self.torch.inference_mode():
            for new, buffer in zip((*self.keys, *self.values), (*old[0], *old[1]), strict=True):
                new[:n, :, offset : offset + width] = buffer[:n, :, lo:hi].clone()
            self.mask[:n, offset : offset + width] = old[2][:n, lo:hi].clone()
        self.lo, self.hi = offset, offset + width


@dataclass(eq=False)
class Sequence:
    """One generation request inside the scheduler."""

    prompt: list[int]
    params: SamplingParams
    events: asyncio.Queue
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False  # the consumer has read the final event
    final_sent: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: object = None
    cancelled_at: int = 0  # tokens generated when the cancellation arrived
    queued_step: int = 0  # the scheduler's decode step count when the sequence was queued
    top: tuple[tuple[int, float], ...] | None = None  # the last sampled token's alternatives (logprobs)
    grammar: object = None  # structured output: the sequence's matcher (constraints.py)

    def cancel(self) -> None:
        """Leave the batch at the next step (the client went away)."""
        if not self.cancelled:
            self.cancelled, self.cancelled_at = True, len(self.generated)


class GenerationStream:
    """The consumer's side of a sequence: `async for event in stream`; `cancel()` when abandoned."""

    def __init__(self, sequence: Sequence) -> None:
        self.sequence = sequence

    def cancel(self) -> None:
        self.sequence.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self.sequence.done and self.sequence.events.empty():
            raise StopAsyncIteration
        event = await self.sequence.events.get()
        if event.final:
            self.sequence.done = True
        return event


class _Metrics:
    """One model's children of the scheduler's metrics, looked up once (`labels()` takes a lock
    and builds a key on every call)."""

    def __init__(self, name: str) -> None:
        self.running, self.waiting = RUNNING.labels(name), WAITING.labels(name)
        self.ttft, self.tpot, self.tokens = TTFT.labels(name), TPOT.labels(name), TOKENS.labels(name)
        self.prompt_tokens, self.decode_steps = PROMPT_TOKENS.labels(name), DECODE_STEPS.labels(name)
        self.decode_batch, self.cancel_tail = DECODE_BATCH.labels(name), CANCEL_TAIL.labels(name)
        self.admission_wait, self.prefill = ADMISSION_WAIT.labels(name), PREFILL.labels(name)
        self.decode = DECODE.labels(name)


class _Batch:
    """The running sequences (sequence i is row i of `slots`) and their KV cache and mask."""

    def __init__(self) -> None:
        self.sequences: list[Sequence] = []
        self.slots: _Slots | None = None  # allocated at the first join
        self.last: list[int] = []  # the token each sequence feeds into the next step


class GenerationScheduler:
    """Continuous batching for one loaded causal LM (the `batcher` of a generation model).

    The KV cache of the running batch is a window of preallocated buffers per layer (`_Slots`:
    sequence i is row i, right-aligned, left padding masked): newcomers are prefilled together and
    their cache copied into free rows (a lone newcomer to a busy batch waits up to HOLD_STEPS steps
    for company, `_holds`), a leaver's row is refilled by the last row, and columns that became
    padding for every row leave the window. Attention masks and explicit position ids make the
    padded batch compute exactly what each sequence would alone (tested against unbatched decoding).

    The scheduling loop runs in the model's own engine thread (vLLM's engine core busy loop, in a
    thread): it admits, prefills, decodes, samples and decides which sequences end, step after
    step, without waiting for the event loop between steps. Each step's events go to the event
    loop in one `call_soon_threadsafe`, which puts them on the sequences' queues. The event loop
    only queues newcomers (`submit`) and flags cancellations; a cancelled sequence leaves the batch
    at the next step. Before, every step was a round trip through the event loop (run_in_executor,
    then emitting there): the engine idled for the loop's turn, 0.9 ms per step at one stream.
    """

    def __init__(self, name: str, runtime: CausalLMRuntime, spec: InferenceSpec, stats=None) -> None:
        import torch

        self._torch = torch
        self.name = name
        self.runtime = runtime
        self.spec = spec
        self.stats = stats
        self.max_running = spec.max_batch_size
        self._metrics = _Metrics(name)
        self._emitted = 0  # tokens emitted since the metric was last increased
        self._steps = 0  # decode steps run (`_holds`)
        # Appended by the event loop (`submit`), taken by the engine thread (deque's append and
        # popleft are atomic); `_work` wakes an idle engine.
        self._waiting: deque[Sequence] = deque()
        self._work = threading.Event()
        self._batch = _Batch()  # the engine thread's
        self._outbox: list[tuple[asyncio.Queue, TokenEvent]] = []  # the engine's events of this step
        self._parameters = sum(p.numel() for p in runtime.model.parameters())
        self._threads = spec.threads  # the engine's intra-op threads now (`_use_threads`)
        self._grammars = Grammars(runtime)
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._stopped: Future = Future()  # the engine thread has returned
        # A daemon thread, not an executor's: a process that exits without close() must not wait
        # for an engine that sleeps until work arrives.
        threading.Thread(target=self._engine, name=f"generate-{name}", daemon=True).start()

    @property
    def queued_rows(self) -> int:
        return len(self._waiting)

    def _check_ids(self, prompt: list[int], params: SamplingParams) -> None:
        """Refuse token ids past the vocabulary: the prompt's, logit_bias's and stop_token_ids'."""
        vocab = self.runtime.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise invalid(f"input '{InputTensor.INPUT_IDS}' holds token ids outside [0, {vocab})")
        for key, ids in (
            (RequestParameter.LOGIT_BIAS, [t for t, _ in params.logit_bias]),
            ("stop_token_ids", params.stop_token_ids),
        ):
            if ids and not 0 <= min(ids) <= max(ids) < vocab:
                raise invalid(f"`{key}` holds token ids outside [0, {vocab})", param=key)

    def submit(self, prompt: list[int], params: SamplingParams) -> GenerationStream:
        """Queue a sequence; its tokens arrive on the returned stream."""
        if self._closed:
            raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, f"model '{self.name}' is unloading")
        params = params.with_defaults(self.runtime.sampling_defaults)
        params.validate()
        if not prompt:
            raise invalid(f"input '{InputTensor.INPUT_IDS}' has no tokens (model '{self.name}')")
        self._check_ids(prompt, params)
        if len(prompt) >= self.runtime.max_context:
            raise invalid(
                f"the prompt has {len(prompt)} tokens; model '{self.name}' has a context of {self.runtime.max_context}"
            )
        if len(self._waiting) >= self.spec.max_queue_size:
            raise MeshError(ErrorCode.OVERLOADED, f"model '{self.name}' has {len(self._waiting)} sequences waiting")
        sequence = Sequence(list(prompt), params, asyncio.Queue())
        generator = self._torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        sequence.generator = generator
        sequence.grammar = self._grammars.matcher(params.json_schema) if params.json_schema else None
        sequence.queued_step = self._steps
        self._waiting.append(sequence)
        self._metrics.waiting.set(len(self._waiting))
        self._work.set()
        return GenerationStream(sequence)

    async def close(self) -> None:
        """Stop the engine after its current step; every sequence left ends CANCELLED."""
        self._closed = True
        for sequence in [*self._waiting, *self._batch.sequences]:
            sequence.cancel()
        self._work.set()
        await asyncio.wrap_future(self._stopped)
        for sequence in [*self._waiting, *self._batch.sequences]:
            self._finish(sequence, FinishReason.CANCELLED)
        self._waiting.clear()
        self._batch = _Batch()
        outbox, self._outbox = self._outbox, []
        _deliver(outbox)

    # -- the engine thread ----------------------------------------------------------------------
    def _engine(self) -> None:
        try:
            if self.spec.runtime_engine == "torch":
                set_torch_threads(self.spec.threads)
            while not self._closed:
                if not self._waiting and not self._batch.sequences:
                    self._work.wait()
                    self._work.clear()  # `submit` appends before it sets: the next check sees it
                    continue
                self._iterate()
        except BaseException:  # a bug in the loop itself: say so, end every sequence, refuse new ones
            log.exception("generation engine stopped", extra={"fields": {"model": self.name}})
            self._closed = True
            for sequence in [*self._waiting, *self._batch.sequences]:
                self._finish(sequence, FinishReason.ERROR, error="generation engine stopped")
            self._flush()
        finally:
            self._stopped.set_result(None)

    def _iterate(self) -> None:
        """One turn: admit what fits, one decode step, then hand the turn's events to the loop."""
        try:
            self._admit()
            if self._batch.sequences:
                self._step()
        except Exception as exc:  # keep serving: fail the sequences in flight, not the model
            log.exception("generation step failed", extra={"fields": {"model": self.name}})
            for sequence in [*self._batch.sequences]:
                self._finish(sequence, FinishReason.ERROR, error=f"generation failed: {type(exc).__name__}")
            self._batch = _Batch()
        self._metrics.running.set(len(self._batch.sequences))
        self._metrics.waiting.set(len(self._waiting))
        self._flush()

    def _flush(self) -> None:
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        try:
            self._loop.call_soon_threadsafe(_deliver, outbox)
        except RuntimeError:  # the event loop is closed: nobody is left to read them
            pass

    def _holds(self) -> bool:
        """Whether the waiting sequences wait one more step for company. A prefill forward costs
        about what a decode step of the whole batch costs (on CPU it reads every weight once), so a
        busy batch (>= HOLD_MIN_RUNNING sequences) prefills newcomers in pairs or more: a lone one
        waits at most HOLD_STEPS decode steps. An idle or small batch admits at once."""
        return (
            len(self._batch.sequences) >= HOLD_MIN_RUNNING
            and len(self._waiting) == 1
            and self._steps - self._waiting[0].queued_step < HOLD_STEPS
            and not self._waiting[0].cancelled
        )

    def _admit(self) -> None:
        """Prefill every sequence that fits, in one left-padded forward, and join them."""
        if self._holds():
            return
        joining: list[Sequence] = []
        while self._waiting and len(self._batch.sequences) + len(joining) < self.max_running:
            sequence = self._waiting.popleft()
            if sequence.cancelled:
                self._finish(sequence, FinishReason.CANCELLED)
            else:
                joining.append(sequence)
        if not joining:
            return
        started = time.perf_counter()
        for sequence in joining:
            self._metrics.admission_wait.observe(started - sequence.submitted)
        try:
            sampled, layers, mask, scores = self._prefill(joining)
        except Exception as exc:  # they left the queue and never joined: end them; the batch goes on
            log.exception("prefill failed", extra={"fields": {"model": self.name, "sequences": len(joining)}})
            for sequence in joining:
                self._finish(sequence, FinishReason.ERROR, error=f"generation failed: {type(exc).__name__}")
            return
        now = time.perf_counter()
        self._metrics.prefill.observe(now - started)
        self._metrics.prompt_tokens.inc(sum(len(s.prompt) for s in joining))
        for sequence, prompt_logprobs in zip(joining, scores, strict=True):
            if prompt_logprobs is not None and not sequence.cancelled:
                self._outbox.append((sequence.events, TokenEvent(None, prompt_logprobs=tuple(prompt_logprobs))))
        emit = self._emit
        keep = [i for i, (s, (t, lp)) in enumerate(zip(joining, sampled, strict=True)) if emit(s, t, lp, now)]
        self._count_emitted()
        if keep and len(keep) < len(joining):
            index = self._torch.tensor(keep, device=mask.device)
            layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]
            mask = mask.index_select(0, index)
        if keep:
            self._join([joining[i] for i in keep], [sampled[i][0] for i in keep], layers, mask)

    def _use_threads(self, tokens: int) -> None:
        """Engine thread: the intra-op threads for a forward pass over `tokens` tokens (SOLO_WORK)."""
        threads = 1 if tokens * self._parameters < SOLO_WORK else self.spec.threads
        if threads != self._threads:
            self._torch.set_num_threads(threads)
            self._threads = threads

    def _prefill(self, sequences: list[Sequence]):
        self._use_threads(sum(len(s.prompt) for s in sequences))
        logits, layers, mask, scores = self.runtime.prefill_batch(
            [s.prompt for s in sequences], [s.params.prompt_logprobs for s in sequences]
        )
        return self._sample_rows(logits, sequences), layers, mask, scores

    def _join(self, sequences: list[Sequence], tokens: list[int], layers, mask) -> None:
        """Merge newcomers (their left-padded cache and mask) into the running batch."""
        batch = self._batch
        if batch.slots is None:
            batch.slots = _Slots(self._torch, self.max_running, self.runtime.max_context)
        batch.slots.join(layers, mask)
        batch.sequences.extend(sequences)
        batch.last.extend(tokens)

    def _step(self) -> None:
        self._drop([s for s in self._batch.sequences if s.cancelled], FinishReason.CANCELLED)
        if not self._batch.sequences:
            return
        self._metrics.decode_batch.observe(len(self._batch.sequences))
        self._metrics.decode_steps.inc()
        self._steps += 1
        sampled = self._decode()
        now, emit = time.perf_counter(), self._emit
        finished = [s for s, (t, lp) in zip(self._batch.sequences, sampled, strict=True) if not emit(s, t, lp, now)]
        self._count_emitted()
        self._batch.last = [t for t, _ in sampled]
        self._drop(finished, None)

    def _decode(self) -> list[tuple[int, float]]:
        started = time.perf_counter()
        batch = self._batch
        self._use_threads(len(batch.sequences))
        logits = self.runtime.decode_slots(batch.last, batch.slots)
        sampled = self._sample_rows(logits, batch.sequences)
        self._metrics.decode.observe(time.perf_counter() - started)
        return sampled

    def _sample_rows(self, logits, sequences: list[Sequence]) -> list[tuple[int, float]]:
        """Sample every row: (token, logprob). Temperature, softmax and
        the draw run once for the whole batch (inverse CDF: one uniform per row, then one
        searchsorted); only rows that ask for top-k, top-p, min-p or a repetition penalty take the
        per-row path. Each row's uniform comes from its own generator, so a seeded request repeats
        whatever it is batched with. Hooks, in order: raw logprobs are read before any change,
        then the end-token mask, then the OpenAI penalties and logit bias (in place)."""
        raw = self._raw_logprobs(logits, sequences)
        self._mask_early_ends(logits, sequences)
        self._adjust_logits(logits, sequences)
        self._grammars.mask(logits, sequences)  # rows with a grammar: only the tokens it allows (after the bias)
        return self._with_raw_logprobs(self._draw_rows(logits, sequences), raw, sequences)

    def _draw_rows(self, logits, sequences: list[Sequence]) -> list[tuple[int, float]]:
        """(token, logprob under the sampling distribution) per row."""
        torch = self._torch
        plain = [
            i for i, s in enumerate(sequences)
            if s.params.top_k == 0 and s.params.top_p >= 1.0 and s.params.repetition_penalty == 1.0
            and s.params.min_p == 0.0
        ]  # fmt: skip
        results: list[tuple[int, float] | None] = [None] * len(sequences)
        if plain:
            rows = (
                logits
                if len(plain) == len(sequences)
                else logits.index_select(0, torch.tensor(plain, device=logits.device))
            )
            tokens, chosen = self._draw_plain(rows, [sequences[i] for i in plain])
            for i, token, logprob in zip(plain, tokens.tolist(), chosen.tolist(), strict=True):
                results[i] = (token, logprob)
        for i, sequence in enumerate(sequences):
            if results[i] is None:
                results[i] = self._sample(logits[i], sequence)
        return results

    def _draw_plain(self, rows, sequences: list[Sequence]):
        """(tokens, their logprobs) for rows without top-k, top-p, min-p or a repetition penalty:
        greedy rows take the argmax of their logits (what generate() picks); the others draw by
        inverse CDF, one uniform per row from the row's own generator. A batch of only greedy
        rows skips the draw, one without a greedy row the argmax."""
        torch = self._torch
        temperatures = [s.params.temperature for s in sequences]
        if not any(temperatures):
            tokens = rows.argmax(dim=-1)
            chosen = torch.log_softmax(rows, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
            return tokens, chosen
        temps = torch.tensor(temperatures, device=rows.device)
        greedy = temps == 0
        log_probs = torch.log_softmax(rows / torch.where(greedy, 1.0, temps).unsqueeze(1), dim=-1)
        uniforms = torch.tensor(
            [
                torch.rand(1, generator=s.generator).item() if t else 0.0
                for s, t in zip(sequences, temperatures, strict=True)
            ]
        )
        cdf = log_probs.exp().cumsum(dim=-1)
        # The smallest token whose cumulative probability reaches u (a zero-probability token is
        # never picked: the target is above every flat stretch it would start).
        target = (uniforms.to(cdf.device) * cdf[:, -1]).clamp(min=1e-12).unsqueeze(1)
        drawn = torch.searchsorted(cdf, target).squeeze(1).clamp(max=cdf.shape[1] - 1)
        tokens = torch.where(greedy, rows.argmax(dim=-1), drawn) if not all(temperatures) else drawn
        return tokens, log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)

    def _raw_logprobs(self, logits, sequences: list[Sequence]) -> dict[int, object] | None:
        """Per row that asks for logprobs, its raw log-probabilities [vocab] (before any mask,
        penalty, bias or temperature: what vLLM reports by default); None when no row asks."""
        rows = [i for i, s in enumerate(sequences) if s.params.logprobs]
        if not rows:
            return None
        torch = self._torch
        index = torch.tensor(rows, device=logits.device)
        scores = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
        return dict(zip(rows, scores, strict=True))

    def _with_raw_logprobs(self, results: list[tuple[int, float]], raw, sequences: list[Sequence]):
        """A row that asks for logprobs gets its token's raw log-probability, and its `top_logprobs`
        most likely tokens go on the sequence (`Sequence.top`, which the token's event carries)."""
        if raw is None:
            return results
        for i, scores in raw.items():
            token, k = results[i][0], sequences[i].params.top_logprobs
            top = ()
            if k:
                values, ids = self._torch.topk(scores, min(k, scores.shape[-1]))
                top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            sequences[i].top = top
            results[i] = (token, float(scores[token]))
        return results

    def _adjust_logits(self, logits, sequences: list[Sequence]) -> None:
        """OpenAI's frequency and presence penalties (on the tokens generated so far) and the
        logit bias, per row that asks for them, in place."""
        torch = self._torch
        for i, sequence in enumerate(sequences):
            p = sequence.params
            if not p.adjusts_logits:
                continue
            with torch.inference_mode():  # the logits are an inference tensor
                if sequence.generated and (p.frequency_penalty or p.presence_penalty):
                    ids, counts = torch.unique(
                        torch.tensor(sequence.generated, device=logits.device), return_counts=True
                    )
                    logits[i, ids] -= counts.to(logits.dtype) * p.frequency_penalty + p.presence_penalty
                if p.logit_bias:
                    ids = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
                    biases = torch.tensor([b for _, b in p.logit_bias], device=logits.device, dtype=logits.dtype)
                    logits[i, ids] += biases

    def _mask_early_ends(self, logits, sequences: list[Sequence]) -> None:
        """Rows that have not reached their `min_new_tokens` cannot pick an end or stop token
        (in place, one indexed write per distinct set of stop ids)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, sequence in enumerate(sequences):
            if len(sequence.generated) < sequence.params.min_new_tokens:
                groups.setdefault(sequence.params.stop_token_ids, []).append(i)
        torch = self._torch
        for stop_ids, rows in groups.items():
            ends = sorted(self.runtime.eos_token_ids.union(stop_ids))
            if ends:
                index = torch.tensor(rows, device=logits.device).unsqueeze(1)
                with torch.inference_mode():  # the logits are an inference tensor
                    logits[index, torch.tensor(ends, device=logits.device).unsqueeze(0)] = float("-inf")

    def _drop(self, leaving: list[Sequence], reason: FinishReason | None) -> None:
        """Remove sequences from the batch: the last row fills each freed row (`_Slots.remove`)."""
        if not leaving:
            return
        batch = self._batch
        for sequence in leaving:
            if reason is not None:
                self._finish(sequence, reason)
        gone = set(map(id, leaving))
        rows = [i for i, s in enumerate(batch.sequences) if id(s) in gone]
        for row in reversed(rows):  # from the end: the last row is never one that leaves
            batch.slots.remove(row)
            last = batch.sequences.pop(), batch.last.pop()
            if row < len(batch.sequences):
                batch.sequences[row], batch.last[row] = last
        batch.slots.trim()

    # -- per-token bookkeeping --------------------------------------------------------------------
    def _emit(self, sequence: Sequence, token: int, logprob: float, now: float) -> bool:
        """Record a token sampled at `now`; False when the sequence has ended (and was finished).
        The caller counts the step's tokens in the metrics (one increment per step)."""
        if sequence.cancelled:
            self._finish(sequence, FinishReason.CANCELLED)
            return False
        if sequence.grammar is not None:
            self._grammars.advance(sequence, token)
        ends = token in sequence.params.stop_token_ids
        if ends or (token in self.runtime.eos_token_ids and not sequence.params.ignore_eos):
            self._finish(sequence, FinishReason.STOP)
            return False
        if sequence.first_token_at is None:
            sequence.first_token_at = now
            self._metrics.ttft.observe(now - sequence.submitted)
        sequence.generated.append(token)
        self._emitted += 1
        self._outbox.append((sequence.events, TokenEvent(token, logprob=logprob, top=sequence.top)))
        total = len(sequence.prompt) + len(sequence.generated)
        if len(sequence.generated) >= sequence.params.max_new_tokens or total >= self.runtime.max_context:
            self._finish(sequence, FinishReason.LENGTH)
            return False
        return True

    def _count_emitted(self) -> None:
        if self._emitted:
            self._metrics.tokens.inc(self._emitted)
            self._emitted = 0

    def _finish(self, sequence: Sequence, reason: FinishReason, *, error: str | None = None) -> None:
        if sequence.final_sent:
            return
        sequence.final_sent = True
        FINISHED.labels(self.name, reason).inc()
        n = len(sequence.generated)
        if reason == FinishReason.CANCELLED:
            self._metrics.cancel_tail.observe(n - sequence.cancelled_at)
        if n > 1 and sequence.first_token_at is not None:
            self._metrics.tpot.observe((time.perf_counter() - sequence.first_token_at) / (n - 1))
        self._outbox.append((sequence.events, TokenEvent(None, True, reason, len(sequence.prompt), n, error)))

    def _sample(self, logits, sequence: Sequence) -> tuple[int, float]:
        torch = self._torch
        p = sequence.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(sequence.prompt + sequence.generated)), device=logits.device)
            values = logits.index_select(0, seen)
            logits = logits.clone()
            logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            logits = logits.clamp(max=torch.finfo(logits.dtype).max)  # a penalty near 0: +inf, then NaN
        if p.temperature == 0.0:
            token = int(logits.argmax())
            return token, float(torch.log_softmax(logits, -1)[token])
        logits = (logits / p.temperature).clamp(max=torch.finfo(logits.dtype).max)
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0.0:  # vLLM's min-p: below min_p times the top probability is dropped
            probs = torch.where(probs < p.min_p * probs.max(), torch.zeros_like(probs), probs)
            probs = probs / probs.sum()
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, 0)
            cut = cumulative - sorted_probs > p.top_p  # keep the smallest set reaching top_p
            sorted_probs[cut] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            probs = probs / probs.sum()
        token = int(torch.multinomial(probs.cpu(), 1, generator=sequence.generator))
        return token, float(torch.log(probs[token].clamp(min=1e-30)))


def _deliver(outbox: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    """Event loop: put one engine turn's events on their sequences' queues, in order."""
    for queue, event in outbox:
        queue.put_nowait(event)

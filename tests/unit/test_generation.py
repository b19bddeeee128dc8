"""Continuous batching against Hugging Face's own generate(): same tokens, shared decode steps,
cancellation within one step, stop conditions, seeded sampling. A tiny random Llama, saved in HF
format, stands in for a trained model (the scheduler only needs the architecture)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.catalog import InferenceSpec, TensorSpec
from services.common.errors import ErrorCode, MeshError
from services.inference.generation import DECODE_BATCH, CausalLMRuntime, GenerationScheduler, SamplingParams

SPEC = InferenceSpec(
    name="tiny-llama",
    runtime="causal_lm",
    inputs=(TensorSpec(name="input_ids", datatype="INT64", dims=(-1,)),),
    outputs=(TensorSpec(name="token_id", datatype="INT64", dims=(1,)),),
    max_batch_size=8,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=96, eos_token_id=96, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    GenerationConfig(eos_token_id=96, pad_token_id=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runtime(model_dir):
    return CausalLMRuntime(model_dir)


def reference(runtime: CausalLMRuntime, prompt: list[int], n: int) -> list[int]:
    """HF generate(), greedy, one sequence alone."""
    with torch.inference_mode():
        out = runtime.model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


async def collect(stream) -> tuple[list[int], str]:
    tokens, reason = [], None
    async for event in stream:
        if event.final:
            reason = event.finish_reason
        else:
            tokens.append(event.token_id)
    return tokens, reason


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [30]]


async def test_concurrent_sequences_match_generate_alone(runtime):
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    steps_before = DECODE_BATCH.labels("tiny-llama")._sum.get()
    try:
        params = SamplingParams(max_new_tokens=12, temperature=0.0)
        streams = [scheduler.submit(p, params) for p in PROMPTS]
        results = await asyncio.gather(*(collect(s) for s in streams))
    finally:
        await scheduler.close()
    for prompt, (tokens, reason) in zip(PROMPTS, results, strict=True):
        expected = reference(runtime, prompt, 12)
        if 96 in expected:  # our scheduler stops at EOS; generate() was told not to
            expected = expected[: expected.index(96)]
        assert tokens == expected
        assert reason == ("length" if len(tokens) == 12 else "stop")
    # The four sequences shared decode steps: more rows were decoded than steps were run.
    assert DECODE_BATCH.labels("tiny-llama")._sum.get() - steps_before > 12


async def test_a_sequence_joining_mid_generation_is_exact(runtime):
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    try:
        params = SamplingParams(max_new_tokens=16, temperature=0.0)
        first = scheduler.submit(PROMPTS[0], params)
        seen = []
        async for event in first:  # let it run a few steps alone, then add a second sequence
            seen.append(event)
            if len(seen) == 4:
                second = asyncio.create_task(collect(scheduler.submit(PROMPTS[2], params)))
        late, _ = await second
    finally:
        await scheduler.close()
    expected = reference(runtime, PROMPTS[2], 16)
    assert late == (expected[: expected.index(96)] if 96 in expected else expected)
    early = [e.token_id for e in seen if not e.final]
    expected_first = reference(runtime, PROMPTS[0], 16)
    assert early == (expected_first[: expected_first.index(96)] if 96 in expected_first else expected_first)


async def test_a_busy_batch_holds_a_lone_newcomer_at_most_hold_steps(runtime, monkeypatch):
    import services.inference.generation as generation

    monkeypatch.setattr(generation, "HOLD_MIN_RUNNING", 2)
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    try:
        params = SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0.0, ignore_eos=True)
        running = [scheduler.submit(prompt, params) for prompt in PROMPTS[:2]]
        seen = []
        async for event in running[0]:  # two sequences running: a busy batch for this test
            seen.append(event)
            if len(seen) == 3:
                steps = scheduler._steps
                late = scheduler.submit(PROMPTS[2], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
                tokens, _ = await collect(late)
                joined_after = scheduler._steps - steps - len(tokens) + 1  # steps before its prefill
        await collect(running[1])
    finally:
        await scheduler.close()
    assert 1 <= joined_after <= generation.HOLD_STEPS + 1  # held, but no longer than HOLD_STEPS
    assert tokens == reference(runtime, PROMPTS[2], 8)


async def test_cancelled_sequence_leaves_within_one_step(runtime):
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    try:
        keep = scheduler.submit(PROMPTS[1], SamplingParams(max_new_tokens=40, temperature=1.0, seed=1))
        stream = scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=40, temperature=1.0, seed=2))
        events = []
        async for event in stream:
            events.append(event)
            if len(events) == 3:
                stream.cancel()
        other, _ = await collect(keep)
    finally:
        await scheduler.close()
    tokens = [e for e in events if not e.final]
    final = events[-1]
    assert final.final and final.finish_reason == "cancelled"
    # The engine thread runs ahead of a slow reader, so tokens made before the cancellation may
    # still be queued for it; after the cancellation reached the scheduler, at most the token of
    # the step already running is made.
    assert final.completion_tokens == len(tokens)
    assert final.completion_tokens - stream.sequence.cancelled_at <= 1
    assert len(other) > 4  # the other sequence went on


async def test_stop_token_ids_and_max_tokens(runtime):
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    try:
        greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
        tokens, _ = await collect(scheduler.submit(PROMPTS[3], greedy))
        stop_at = tokens[3]
        stopped, why = await collect(
            scheduler.submit(PROMPTS[3], SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(stop_at,)))
        )
        short, length = await collect(scheduler.submit(PROMPTS[3], SamplingParams(max_new_tokens=2, temperature=0.0)))
    finally:
        await scheduler.close()
    assert stopped == tokens[: tokens.index(stop_at)] and why == "stop"
    assert short == tokens[:2] and length == "length"


async def test_seeded_sampling_repeats_and_bad_requests_are_refused(runtime):
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    try:
        params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=20, seed=7, repetition_penalty=1.2)
        a, _ = await collect(scheduler.submit(PROMPTS[0], params))
        b, _ = await collect(scheduler.submit(PROMPTS[0], params))
        for prompt, params in (([], SamplingParams()), ([500], SamplingParams()), ([1] * 96, SamplingParams())):
            with pytest.raises(MeshError, match=r"input_ids|context"):
                scheduler.submit(prompt, params)
        with pytest.raises(MeshError, match="top_p"):
            scheduler.submit([1], SamplingParams(top_p=0.0))
    finally:
        await scheduler.close()
    assert a == b and len(a) > 0


async def test_min_new_tokens_masks_the_end_until_reached(runtime):
    """vLLM's `min_tokens`: a greedy sequence that would stop early (EOS made likely by a bias on
    its logit) runs on to min_new_tokens; the stop ids are masked too, and only until then."""
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    original = runtime.model.lm_head.bias
    runtime.model.lm_head.bias = torch.nn.Parameter(torch.zeros(97))
    runtime.model.lm_head.bias.data[96] = 1e4  # the end token wins every greedy step
    try:
        alone, why = await collect(scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0.0)))
        held, held_why = await collect(
            scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=20, min_new_tokens=7, temperature=0.0))
        )
        sampled, _ = await collect(
            scheduler.submit(
                PROMPTS[1], SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=1.0, seed=3, top_k=5)
            )
        )
        with pytest.raises(MeshError, match="min_tokens"):
            scheduler.submit([1], SamplingParams(max_new_tokens=4, min_new_tokens=5))
    finally:
        runtime.model.lm_head.bias = original
        await scheduler.close()
    assert alone == [] and why == "stop"
    assert len(held) == 7 and 96 not in held and held_why == "stop"  # the end came as soon as it could
    assert len(sampled) == 12 and 96 not in sampled


async def test_a_failed_prefill_ends_its_sequences_and_the_scheduler_goes_on(runtime, monkeypatch):
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)
    real = runtime.prefill_batch

    def broken(prompts, scored=None):
        raise RuntimeError("out of memory")

    try:
        running = scheduler.submit(PROMPTS[1], SamplingParams(max_new_tokens=30, min_new_tokens=30, temperature=0.0))
        first = await asyncio.wait_for(running.__anext__(), 10)  # it is in the batch now
        monkeypatch.setattr(runtime, "prefill_batch", broken)
        tokens, why = await asyncio.wait_for(
            collect(scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=4))), 10
        )
        monkeypatch.setattr(runtime, "prefill_batch", real)
        rest, running_why = await asyncio.wait_for(collect(running), 10)
        after, _ = await asyncio.wait_for(
            collect(scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=4, temperature=0.0))), 10
        )
    finally:
        await scheduler.close()
    assert tokens == [] and why == "error"
    assert len(after) > 0
    # The newcomer's failure did not touch the running batch: that sequence ran to its end.
    assert first.token_id is not None and len(rest) == 29 and running_why == "length"


class _EngineBug(BaseException):
    pass


async def test_a_stopped_engine_ends_its_sequences_and_refuses_new_ones(runtime):
    """A bug that escapes the engine thread's loop loses nothing silently: the sequences it held
    end with an error, and later submissions are refused instead of waiting forever."""
    scheduler = GenerationScheduler("tiny-llama", runtime, SPEC)

    def broken():
        raise _EngineBug("a bug in the loop")

    scheduler._iterate = broken  # the engine thread looks it up on each turn
    try:
        tokens, why = await asyncio.wait_for(
            collect(scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=4))), 10
        )
        with pytest.raises(MeshError) as refused:
            scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=4))
    finally:
        await asyncio.wait_for(scheduler.close(), 10)
    assert tokens == [] and why == "error"
    assert refused.value.code == ErrorCode.UPSTREAM_UNAVAILABLE


def test_batched_sampling_follows_the_distribution(runtime):
    """The batched inverse-CDF draw: frequencies match the softmax, zero-probability tokens are
    never drawn, greedy rows pick the argmax, and a row's seed alone decides its draw."""
    from services.inference.constraints import Grammars
    from services.inference.generation import Sequence

    scheduler = GenerationScheduler.__new__(GenerationScheduler)
    scheduler._torch, scheduler.runtime = torch, runtime
    scheduler._grammars = Grammars(runtime)  # no row has one: the mask is a no-op
    probs = torch.zeros(97)
    probs[[3, 40, 90]] = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(400, 97).clone()

    def rows(seed0: int, temperature: float = 1.0) -> list[Sequence]:
        out = []
        for k in range(400):
            seq = Sequence([1], SamplingParams(temperature=temperature), asyncio.Queue())
            seq.generator = torch.Generator().manual_seed(seed0 + k)
            out.append(seq)
        return out

    drawn = [t for t, _ in scheduler._sample_rows(logits.clone(), rows(0))]
    counts = {t: drawn.count(t) / len(drawn) for t in set(drawn)}
    assert set(counts) <= {3, 40, 90}
    assert abs(counts[3] - 0.5) < 0.08 and abs(counts[40] - 0.3) < 0.08 and abs(counts[90] - 0.2) < 0.08
    assert [t for t, _ in scheduler._sample_rows(logits.clone(), rows(0))] == drawn  # same seeds, same draws
    greedy = scheduler._sample_rows(logits.clone(), rows(0, temperature=0.0))
    assert {t for t, _ in greedy} == {3} and abs(greedy[0][1] - float(torch.tensor(0.5).log())) < 1e-5


def _prefilled(lengths: list[int], width: int, seed: int):
    """A left-padded prefill cache (2 layers, [k, 2 heads, width, 4]) and its mask."""
    generator = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(len(lengths), 2, width, 4, generator=generator),) * 2 for _ in range(2)]
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return layers, mask


def test_the_slot_cache_writes_steps_in_place_and_moves_one_row_per_leaver():
    from services.inference.generation import _Slots

    slots = _Slots(torch, rows=4, max_context=400)
    first, first_mask = _prefilled([3, 5], 5, seed=0)
    slots.join(first, first_mask)
    mask, positions = slots.step_inputs()
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]] and positions.tolist() == [3, 5]
    buffer = slots.keys[0].data_ptr()
    with torch.inference_mode():  # as the forward runs
        keys, _ = slots.cache().layers[0].update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    slots.advance()
    assert keys.shape == (2, 2, 6, 4) and torch.equal(keys[:, :, :5], first[0][0]) and keys[:, :, 5].eq(1).all()
    assert keys.data_ptr() == buffer  # a view of the preallocated buffer: nothing was concatenated
    # A newcomer whose prompt is longer than the window widens it to the left.
    late, late_mask = _prefilled([8], 8, seed=1)
    slots.join(late, late_mask)
    mask, positions = slots.step_inputs()
    assert mask.shape == (3, 9) and mask.sum(1).tolist() == [5, 7, 9] and positions.tolist() == [4, 6, 8]
    assert torch.equal(slots.cache().layers[1].keys[2, :, :8], late[1][0][0])
    slots.advance()
    # Row 0 leaves: the last row (the newcomer) takes its place; the padding columns of every row go.
    slots.remove(0)
    slots.trim()
    assert slots.n == 2 and slots.positions[:2].tolist() == [9, 7]
    assert torch.equal(slots.cache().layers[1].keys[0, :, :8], late[1][0][0])
    assert slots.step_inputs()[0].sum(1).tolist() == [10, 8]
    # Alone for many steps: the window moves back to column 0 and the buffers grow, content kept.
    slots.advance()
    slots.remove(1)
    slots.trim()
    kept, capacity = slots.cache().layers[0].keys[0].clone(), slots.capacity
    for step in range(2 * capacity):
        slots.step_inputs()
        with torch.inference_mode():
            slots.cache().layers[0].update(torch.full((1, 2, 1, 4), float(step)), torch.zeros(1, 2, 1, 4))
        slots.advance()
    keys = slots.cache().layers[0].keys[0]
    assert slots.capacity > capacity and keys.shape[1] == kept.shape[1] + 2 * capacity
    assert torch.equal(keys[:, : kept.shape[1]], kept) and keys[:, -1].eq(2 * capacity - 1).all()
    assert slots.step_inputs()[0].tolist() == [[1] * (keys.shape[1] + 1)]
    assert slots.positions[0] == 10 + 2 * capacity


async def test_admission_wait_prefill_and_decode_steps_are_observed(runtime):
    from services.inference.generation import ADMISSION_WAIT, DECODE, DECODE_STEPS, PREFILL, TOKENS

    name = SPEC.name  # one label: a test elsewhere reads DECODE_BATCH.collect()[0] whatever its label
    waits, prefills, decodes = ADMISSION_WAIT.labels(name)._sum, PREFILL.labels(name)._sum, DECODE.labels(name)._sum
    counts_before = (
        _count(ADMISSION_WAIT, name),
        _count(PREFILL, name),
        TOKENS.labels(name)._value.get(),
        _count(DECODE, name),
        DECODE_STEPS.labels(name)._value.get(),
    )
    scheduler = GenerationScheduler(name, runtime, SPEC)
    try:
        params = SamplingParams(max_new_tokens=3, min_new_tokens=3, temperature=0.0)
        results = await asyncio.gather(*(collect(scheduler.submit(p, params)) for p in PROMPTS))
    finally:
        await scheduler.close()
    waited, prefilled, tokens, decoded, steps = (
        _count(ADMISSION_WAIT, name) - counts_before[0],
        _count(PREFILL, name) - counts_before[1],
        TOKENS.labels(name)._value.get() - counts_before[2],
        _count(DECODE, name) - counts_before[3],
        DECODE_STEPS.labels(name)._value.get() - counts_before[4],
    )
    assert waited == len(PROMPTS)  # one admission wait per sequence
    assert 1 <= prefilled <= len(PROMPTS)  # one per prefill forward: joiners share one
    assert tokens == sum(len(t) for t, _ in results) == 3 * len(PROMPTS)
    assert decoded == steps >= 2  # one forward timing per decode step (3 tokens: prefill + 2 steps)
    assert waits.get() >= 0 and prefills.get() > 0 and decodes.get() > 0


def _count(histogram, name: str) -> float:
    return next(s.value for m in histogram.collect() for s in m.samples
                if s.name.endswith("_count") and s.labels.get("model") == name)  # fmt: skip


async def test_small_steps_run_on_one_thread_and_large_ones_on_the_entry_s(runtime, monkeypatch):
    """SOLO_WORK: a forward pass over few tokens x parameters runs on one intra-op thread, a larger
    one on the entry's `threads`; the tokens are generate()'s either way."""
    from services.inference import generation

    parameters = sum(p.numel() for p in runtime.model.parameters())
    monkeypatch.setattr(generation, "SOLO_WORK", 3 * parameters)  # 1-2 rows: one thread; 3-4: two
    seen: list[tuple[int, int]] = []  # (rows, the worker's threads) per decode step
    decode = runtime.decode_slots

    def recording(tokens, slots):
        seen.append((len(tokens), torch.get_num_threads()))
        return decode(tokens, slots)

    monkeypatch.setattr(runtime, "decode_slots", recording)
    spec = SPEC.model_copy(update={"threads": 2})
    scheduler = GenerationScheduler("tiny-llama", runtime, spec)
    try:
        lengths = (3, 5, 8, 12)  # the batch shrinks 4 -> 3 -> 2 -> 1 rows as they stop
        params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in lengths]
        streams = [scheduler.submit(PROMPTS[0], p) for p in params]
        results = await asyncio.gather(*(collect(s) for s in streams))
    finally:
        await scheduler.close()
    assert {rows for rows, _ in seen} >= {1, 2, 3, 4}
    assert all(threads == (1 if rows < 3 else 2) for rows, threads in seen), seen
    expected = reference(runtime, PROMPTS[0], 12)
    for n, (tokens, _) in zip(lengths, results, strict=True):
        assert tokens == expected[: min(n, expected.index(96) if 96 in expected else n)]

"""DynamicBatcher semantics, with a small deterministic runtime whose output reveals its batch."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from services.common.catalog import InferenceSpec, TensorSpec
from services.common.errors import ErrorCode, MeshError
from services.inference.batcher import DynamicBatcher
from services.inference.runtime import Runtime, pad_and_stack
from services.inference.stats import ModelStats


class SumRuntime(Runtime):
    """Returns each row's sum and the batch's padded width, so tests can see padding and batching."""

    pad_values = {"x": 0}

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gate = gate
        self.fail = fail
        self.batches: list[int] = []
        self.entered = threading.Event()  # set once a batch is executing (the only instance is busy)

    def execute(self, inputs):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(60)
        if self.fail:
            raise RuntimeError("boom")
        x = inputs["x"]
        self.batches.append(x.shape[0])
        return {"sum": x.sum(axis=1), "width": np.full(x.shape[0], x.shape[1])}


async def executing(runtime: SumRuntime) -> None:
    """Wait until the runtime is executing a batch (however loaded the machine is)."""
    assert await asyncio.to_thread(runtime.entered.wait, 60), "no batch started executing"


def spec(**overrides) -> InferenceSpec:
    base = dict(
        name="sum",
        runtime="sentence_embedding",
        inputs=(TensorSpec(name="x", datatype="INT64", dims=(-1,)),),
        outputs=(TensorSpec(name="sum", datatype="INT64", dims=()),),
        max_batch_size=8,
        max_queue_delay_us=0,
        instances=1,
        max_queue_size=64,
    )
    return InferenceSpec(**{**base, **overrides})


def row(*values: int) -> np.ndarray:
    return np.array([values], dtype=np.int64)


def test_pad_and_stack_pads_every_axis_to_the_longest():
    out = pad_and_stack([row(1, 2), row(3, 4, 5, 6), np.array([[7], [8]])], 0)
    assert out.tolist() == [[1, 2, 0, 0], [3, 4, 5, 6], [7, 0, 0, 0], [8, 0, 0, 0]]


async def test_requests_queued_while_busy_run_as_one_padded_batch_with_their_own_results():
    gate = threading.Event()
    runtime = SumRuntime(gate)
    batcher = DynamicBatcher("sum", runtime, spec(), ModelStats())
    first = batcher.submit({"x": row(1)}, 1)  # occupies the only instance
    await executing(runtime)
    rest = [batcher.submit({"x": row(*range(1, n + 2))}, 1) for n in range(5)]
    gate.set()
    await first
    results = await asyncio.gather(*rest)
    assert runtime.batches == [1, 5]
    assert [int(out["sum"][0]) for out, _ in results] == [sum(range(1, n + 2)) for n in range(5)]
    assert {int(out["width"][0]) for out, _ in results} == {5}  # padded to the longest request
    assert all(timing.batch_size == 5 for _, timing in results)
    assert batcher.stats.execution_count == 2 and batcher.stats.inference_count == 6
    await batcher.close()


async def test_batches_never_exceed_max_batch_size():
    gate = threading.Event()
    runtime = SumRuntime(gate)
    batcher = DynamicBatcher("sum", runtime, spec(max_batch_size=4), ModelStats())
    futures = [batcher.submit({"x": row(i)}, 1) for i in range(10)]
    gate.set()
    await asyncio.gather(*futures)
    assert max(runtime.batches) <= 4 and sum(runtime.batches) == 10
    await batcher.close()


async def test_batches_are_cut_at_the_largest_preferred_size_that_is_full():
    gate = threading.Event()
    runtime = SumRuntime(gate)
    batcher = DynamicBatcher("sum", runtime, spec(max_batch_size=8, preferred_batch_sizes=(2, 4)), ModelStats())
    futures = [batcher.submit({"x": row(9)}, 1)]
    await executing(runtime)
    futures += [batcher.submit({"x": row(i)}, 1) for i in range(7)]
    gate.set()
    await asyncio.gather(*futures)
    assert runtime.batches == [1, 4, 2, 1]  # 7 waiting: 4, then 3 left -> 2, then 1
    await batcher.close()


async def test_cancelled_requests_are_dropped_before_execution():
    gate = threading.Event()
    runtime = SumRuntime(gate)
    batcher = DynamicBatcher("sum", runtime, spec(), ModelStats())
    busy = batcher.submit({"x": row(1)}, 1)
    await executing(runtime)
    doomed = batcher.submit({"x": row(2)}, 1)
    kept = batcher.submit({"x": row(3)}, 1)
    doomed.cancel()
    gate.set()
    await busy
    out, _ = await kept
    assert int(out["sum"][0]) == 3
    assert runtime.batches == [1, 1]  # the cancelled row never reached the model
    await batcher.close()


async def test_full_queue_refuses_with_overloaded():
    gate = threading.Event()
    runtime = SumRuntime(gate)
    batcher = DynamicBatcher("sum", runtime, spec(max_queue_size=3), ModelStats())
    futures = [batcher.submit({"x": row(1)}, 1)]
    await executing(runtime)  # the first one is executing, the queue is empty again
    futures += [batcher.submit({"x": row(1)}, 1) for _ in range(3)]
    with pytest.raises(MeshError) as err:
        batcher.submit({"x": row(1)}, 1)
    assert err.value.code is ErrorCode.OVERLOADED and err.value.code.grpc_code.name == "UNAVAILABLE"
    gate.set()
    await asyncio.gather(*futures)
    await batcher.close()


async def test_a_failing_batch_fails_its_requests_and_the_batcher_keeps_serving():
    runtime = SumRuntime(fail=True)
    batcher = DynamicBatcher("sum", runtime, spec(), ModelStats())
    with pytest.raises(MeshError) as err:
        await batcher.submit({"x": row(1)}, 1)
    assert err.value.code is ErrorCode.INTERNAL
    runtime.fail = False
    out, _ = await batcher.submit({"x": row(4, 5)}, 1)
    assert int(out["sum"][0]) == 9
    await batcher.close()


async def test_queue_delay_waits_for_more_requests_when_idle():
    runtime = SumRuntime()
    # A delay far longer than a loaded machine can stall: the batch is cut when it is full, not when
    # the delay ends, so the test waits only as long as the scheduler needs.
    delay_us = 60_000_000
    batcher = DynamicBatcher(
        "sum", runtime, spec(max_queue_delay_us=delay_us, preferred_batch_sizes=(4,)), ModelStats()
    )
    first = batcher.submit({"x": row(1)}, 1)
    await asyncio.sleep(0.02)  # the scheduler has taken the first one and is waiting for more
    others = [batcher.submit({"x": row(1)}, 1) for _ in range(3)]
    await asyncio.gather(first, *others)
    assert runtime.batches == [4]
    await batcher.close()

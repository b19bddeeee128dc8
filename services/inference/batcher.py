"""Dynamic batching: requests for one model wait in a queue and run together, Triton-style.
Each request gets its own result or error; a full queue refuses new work with OVERLOADED.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from services.common.catalog import InferenceSpec
from services.common.errors import ErrorCode, MeshError
from services.inference.runtime import Runtime, pad_and_stack, set_torch_threads, torch_workers
from services.inference.stats import ModelStats

log = logging.getLogger(__name__)

# Torch's OpenMP workers (libgomp) spin for a while after each parallel region (GOMP_SPINCOUNT,
# 300,000 rounds by default) before they sleep. Here the model shares a few cores with the gateway,
# preprocess, postprocess and the gRPC threads, so a spinning worker takes the core the next hop
# needs; but sleeping at once (OMP_WAIT_POLICY=PASSIVE, tried in #18) woke too late for each op of a
# batch of one: all-MiniLM batch 1 went 9.7 -> 16.7 ms. Only a lone batch runs several threads wide
# (the _WideLane below), so this decides c=1: sentiment through the mesh after a burst, three
# interleaved rounds, p50 22.5-24.7 ms at 10,000 rounds against 23.3-33.4 at 100,000 and 25.2-30.2
# at 1,000,000, inference CPU 29-33 ms per request against 33-46. Set before torch is imported (this
# module is imported before any model loads); an operator's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


class _WideLane:
    """The one thread of this process that runs a batch on several intra-op threads.

    libgomp gives every thread that starts a parallel region a team of its own, and once the teams'
    threads outnumber the CPUs it stops spinning altogether (its "throttled" spin of ~100 rounds):
    each op of a forward pass then waits for sleeping workers to wake. Two 1-thread instances whose
    lone batches ran two threads wide each had a team, so on 2 cores every batch ran throttled:
    sentiment batch 1 in process went 16.7 -> 26.5-28.5 ms once a second thread had run one (#18).
    So every model's lone batch runs here, on one thread, and keeps one team of workers; a batch
    that finds the lane busy runs on its instance's own thread at the entry's `threads`."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self.busy = False  # read and written on the event loop only

    def take(self) -> ThreadPoolExecutor | None:
        """The lane's executor, now marked busy, or None while another batch runs on it."""
        if self.busy:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="infer-wide")
        self.busy = True
        return self._executor

    def release(self) -> None:
        self.busy = False


_wide_lane = _WideLane()


@dataclass
class Timing:
    """Nanosecond timestamps (time.monotonic_ns) of one request's path through the batcher."""

    enqueued_ns: int
    started_ns: int = 0
    infer_started_ns: int = 0
    infer_ended_ns: int = 0
    ended_ns: int = 0
    batch_size: int = 0


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future
    timing: Timing = field(default_factory=lambda: Timing(time.monotonic_ns()))


class DynamicBatcher:
    """Queue + scheduler for one loaded model.

    A batch is formed when a model instance is free. It takes queued requests in arrival order
    until `max_batch_size` rows; if it is still below the preferred size it waits up to
    `max_queue_delay_us` for more. While every instance is busy the queue grows, so batches form
    by themselves under load and batch 1 runs with no added delay when the server is idle.

    Variable-length inputs are padded across requests to the longest one. Cancelled requests are
    dropped before execution. A full queue refuses with OVERLOADED (gRPC UNAVAILABLE) so callers
    and balancers retry elsewhere. Torch runs in a thread pool with one thread per instance; the
    event loop only moves futures.
    """

    def __init__(self, name: str, runtime: Runtime, spec: InferenceSpec, stats: ModelStats) -> None:
        self.name = name
        self.runtime = runtime
        self.spec = spec
        self.stats = stats
        self._pending: deque[_Pending] = deque()
        self._pending_rows = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(spec.instances)
        self._executor = torch_workers(spec, f"infer-{name}", spec.instances)
        self._busy = 0  # batches executing now
        # A torch model of several instances gives a batch that runs alone the threads of them all
        # (`_lone_threads`, on the process's _WideLane): at low load batch 1 keeps the latency of one
        # wide instance, and under load each instance runs its own `threads` (no OpenMP barrier
        # waiting for a busy core).
        wide = spec.runtime_engine == "torch" and spec.instances > 1
        self._lone_threads = spec.instances * spec.threads if wide else 0
        self._target = max(spec.preferred_batch_sizes or (spec.max_batch_size,))
        self._delay_s = spec.max_queue_delay_us / 1e6
        self._running: set[asyncio.Task] = set()
        self._loop_task = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{name}")

    @property
    def queued_rows(self) -> int:
        return self._pending_rows

    def submit(self, inputs: dict[str, np.ndarray], rows: int) -> asyncio.Future:
        """Queue one request; its future resolves to (outputs, Timing). Never blocks."""
        if self._loop_task.done():
            raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, f"model '{self.name}' is shutting down")
        if self._pending_rows + rows > self.spec.max_queue_size:
            self.stats.rejected += 1
            raise MeshError(
                ErrorCode.OVERLOADED,
                f"queue of model '{self.name}' is full ({self._pending_rows} rows waiting, "
                f"limit {self.spec.max_queue_size}); retry later",
            )
        item = _Pending(inputs, rows, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._pending_rows += rows
        self._wakeup.set()
        return item.future

    async def _wait_for_work(self, timeout_s: float | None) -> bool:
        self._wakeup.clear()
        if self._pending:
            return True
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _limit(self, rows: int) -> int:
        """Rows this batch may hold: as in Triton, the largest preferred batch size that the waiting
        requests can fill, else max_batch_size."""
        available = min(rows + self._pending_rows, self.spec.max_batch_size)
        fits = [size for size in self.spec.preferred_batch_sizes if size <= available]
        return max(fits) if fits else self.spec.max_batch_size

    def _take(self, batch: list[_Pending], rows: int) -> int:
        """Move queued requests into the batch while they fit; drop cancelled ones."""
        limit = self._limit(rows)
        while self._pending:
            head = self._pending[0]
            if head.future.done():  # cancelled by its caller while queued
                self._pending.popleft()
                self._pending_rows -= head.rows
                continue
            if rows + head.rows > limit and batch:
                break
            self._pending.popleft()
            self._pending_rows -= head.rows
            batch.append(head)
            rows += head.rows
        return rows

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            while not self._pending:
                await self._wait_for_work(None)
            batch: list[_Pending] = []
            rows = self._take(batch, 0)
            if self._delay_s and rows < self._target:
                until = loop.time() + self._delay_s
                while rows < self._target and (left := until - loop.time()) > 0:
                    if await self._wait_for_work(left):
                        rows = self._take(batch, rows)
            batch = [item for item in batch if not item.future.done()]
            if not batch:
                self._slots.release()
                continue
            wide = _wide_lane.take() if self._lone_threads and self._busy == 0 else None
            self._busy += 1
            task = loop.create_task(self._execute(batch, wide))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Pending], wide: ThreadPoolExecutor | None = None) -> None:
        """Run one batch on an instance's thread, or alone on the wide lane (`wide`, already taken)."""
        started = time.monotonic_ns()
        executor, threads = (wide, self._lone_threads) if wide else (self._executor, 0)
        try:
            outputs, infer_started, infer_ended = await asyncio.get_running_loop().run_in_executor(
                executor, self._run_batch, [item.inputs for item in batch], threads
            )
        except Exception:
            log.exception("batch execution failed", extra={"fields": {"model": self.name, "size": len(batch)}})
            self.stats.record_failure()
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(
                        MeshError(ErrorCode.INTERNAL, f"model '{self.name}' failed to execute the batch")
                    )
            return
        finally:
            if wide:
                _wide_lane.release()
            self._busy -= 1
            self._slots.release()
        ended = time.monotonic_ns()
        rows = sum(item.rows for item in batch)
        self.stats.record_batch(
            rows,
            queue_ns=sum(started - item.timing.enqueued_ns for item in batch),
            input_ns=infer_started - started,
            infer_ns=infer_ended - infer_started,
            output_ns=ended - infer_ended,
            requests=len(batch),
        )
        offset = 0
        for item in batch:
            rows_of = {name: array[offset : offset + item.rows] for name, array in outputs.items()}
            sliced = self.runtime.request_outputs(rows_of, item.inputs)  # per-token outputs: its own length
            offset += item.rows
            t = item.timing
            t.started_ns, t.infer_started_ns, t.infer_ended_ns, t.ended_ns = started, infer_started, infer_ended, ended
            t.batch_size = rows
            if not item.future.done():
                item.future.set_result((sliced, t))

    def _run_batch(self, inputs: list[dict[str, np.ndarray]], threads: int = 0):
        """Worker thread: pad and stack the batch, run the model (on `threads` intra-op threads
        when given, on the wide lane: torch keeps the count per thread; an instance's own thread
        keeps the entry's `threads` from torch_workers)."""
        if threads:
            set_torch_threads(threads)
        stacked = {
            name: pad_and_stack([req[name] for req in inputs], self.runtime.pad_values.get(name, 0))
            for name in inputs[0]
        }
        infer_started = time.monotonic_ns()
        outputs = self.runtime.execute(stacked)
        return outputs, infer_started, time.monotonic_ns()

    async def close(self) -> None:
        """Stop scheduling, fail what is queued, let running batches finish."""
        self._loop_task.cancel()
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, f"model '{self.name}' unloaded"))
        self._pending_rows = 0
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=False)

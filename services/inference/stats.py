"""Per-model statistics in Triton's terms (ModelStatistics): counts and cumulative nanoseconds."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    inference_count: int = 0  # rows inferred (a batch of 8 requests of 1 row counts 8)
    execution_count: int = 0  # model executions (batches)
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStat] = field(default_factory=lambda: defaultdict(BatchStat))
    rejected: int = 0

    def record_batch(
        self, rows: int, *, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, requests: int
    ) -> None:
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.queue.add(queue_ns, requests)
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        stat = self.batches[rows]
        stat.compute_input.add(input_ns)
        stat.compute_infer.add(infer_ns)
        stat.compute_output.add(output_ns)

    def record_request(self, ok: bool, total_ns: int) -> None:
        (self.success if ok else self.fail).add(total_ns)

    def record_failure(self) -> None:
        self.execution_count += 1

"""The inference core: validates a request against the model contract the way Triton does, queues
it on the model's batcher and records spans and metrics. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import MeshError, invalid
from services.common.generation_contract import InputTensor, RequestParameter
from services.common.metrics import LATENCY_BUCKETS
from services.common.tensors import NP_DTYPES
from services.inference.batcher import Timing
from services.inference.generation import GenerationStream, SamplingParams, parse_logit_bias
from services.inference.repository import ModelRepository

QUEUE_SECONDS = Histogram(
    "meshserve_inference_queue_seconds",
    "Time a request waited in the batch queue.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
EXECUTE_SECONDS = Histogram(
    "meshserve_inference_batch_execute_seconds",
    "Time to execute one batch (pad + forward).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_ROWS = Histogram(
    "meshserve_inference_batch_size",
    "Rows per executed batch.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128),
)
REQUESTS = Counter("meshserve_inference_requests_total", "Inference requests by outcome.", ["model", "outcome"])
QUEUED = Gauge("meshserve_inference_queued_rows", "Rows waiting in the batch queue.", ["model"])


@dataclass(frozen=True)
class InferInput:
    """One input tensor as received: raw little-endian bytes plus its declared type and shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes


@dataclass(frozen=True)
class InferOutput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    outputs: list[InferOutput]


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class InferenceCore:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self._tracer = trace.get_tracer("meshserve.inference")

    def _decode(self, model: str, spec, inputs: list[InferInput]) -> tuple[dict[str, np.ndarray], int]:
        """Check inputs against the contract; decode them; return (arrays, batch rows)."""
        expected = {t.name: t for t in spec.inputs}
        given = [i.name for i in inputs]
        for name in given:
            if name not in expected:
                raise invalid(f"unexpected inference input '{name}' for model '{model}'")
        if len(set(given)) != len(given):
            raise invalid(f"duplicate inference inputs for model '{model}'")
        missing = [name for name in expected if name not in given]
        if missing:
            raise invalid(
                f"expected {len(expected)} inputs but got {len(given)} inputs for model '{model}'. "
                f"Got input(s) {given}, but missing required input(s) {missing}. "
                "Please provide all required input(s)."
            )
        arrays: dict[str, np.ndarray] = {}
        rows = None
        for item in inputs:
            tensor = expected[item.name]
            if item.datatype != tensor.datatype:
                raise invalid(
                    f"inference input '{item.name}' data-type is '{item.datatype}', but model '{model}' "
                    f"expects '{tensor.datatype}'"
                )
            dims = tensor.dims
            ok = len(item.shape) == len(dims) + 1 and all(
                want == -1 or want == got for want, got in zip(dims, item.shape[1:], strict=False)
            )
            if not ok or any(d < 0 for d in item.shape):
                raise invalid(
                    f"unexpected shape for input '{item.name}' for model '{model}'. "
                    f"Expected {_fmt((-1, *dims))}, got {_fmt(item.shape)}"
                )
            dtype = NP_DTYPES[tensor.datatype]
            want_bytes = int(np.prod(item.shape, dtype=np.int64)) * dtype.itemsize
            if len(item.raw) != want_bytes:
                raise invalid(
                    f"input byte size mismatch for input '{item.name}' for model '{model}'. "
                    f"Expected {want_bytes}, got {len(item.raw)}"
                )
            if rows is None:
                rows = item.shape[0]
            elif item.shape[0] != rows:
                raise invalid(f"input '{item.name}' batch size does not match other inputs for '{model}'")
            arrays[item.name] = np.frombuffer(item.raw, dtype=dtype).reshape(item.shape)
        if len({a.shape for name, a in arrays.items() if -1 in expected[name].dims}) > 1:
            raise invalid(f"variable-length inputs of model '{model}' must share one shape")
        if not rows:
            raise invalid(f"inference request for model '{model}' has an empty batch")
        if rows > spec.max_batch_size:
            raise invalid(f"inference request batch-size must be <= {spec.max_batch_size} for '{model}'")
        return arrays, rows

    async def infer(
        self, model: str, version: str, inputs: list[InferInput], requested: list[str] | None = None
    ) -> InferResult:
        received = time.monotonic_ns()
        slot = self.repository.ready(model, version)
        spec = slot.entry.inference
        if spec.runtime == "causal_lm":  # Triton's answer for a decoupled model
            raise invalid(f"ModelInfer RPC doesn't support models with decoupled transaction policy ('{model}')")
        arrays, rows = self._decode(model, spec, inputs)
        try:
            slot.batcher.runtime.validate(arrays)
        except ValueError as exc:
            raise invalid(f"{exc} (model '{model}')") from None
        if requested:
            known = {t.name for t in spec.outputs}
            for name in requested:
                if name not in known:
                    raise invalid(f"unexpected inference output '{name}' for model '{model}'")
        future = slot.batcher.submit(arrays, rows)
        QUEUED.labels(model).set(slot.batcher.queued_rows)
        try:
            outputs, timing = await future
        except asyncio.CancelledError:
            REQUESTS.labels(model, "cancelled").inc()
            raise
        except MeshError:
            slot.stats.record_request(False, time.monotonic_ns() - received)
            REQUESTS.labels(model, "error").inc()
            raise
        slot.stats.record_request(True, time.monotonic_ns() - received)
        REQUESTS.labels(model, "ok").inc()
        self._observe(model, timing)
        by_name = {t.name: t for t in spec.outputs}
        names = requested or [t.name for t in spec.outputs]
        return InferResult(
            model,
            slot.version,
            [InferOutput(n, by_name[n].datatype, tuple(outputs[n].shape), outputs[n]) for n in names],
        )

    def generate(self, model: str, version: str, inputs: list[InferInput], parameters) -> GenerationStream:
        """Start one generation (ModelStreamInfer on a decoupled model): a stream of tokens."""
        slot = self.repository.ready(model, version)
        if slot.entry.inference.runtime != "causal_lm":
            raise invalid(f"model '{model}' does not generate tokens")
        by_name = {i.name: i for i in inputs}
        unknown = set(by_name) - set(InputTensor)
        if unknown or InputTensor.INPUT_IDS not in by_name:
            raise invalid(
                f"model '{model}' takes inputs '{InputTensor.INPUT_IDS}' (INT64 [n]) and optional "
                f"'{InputTensor.STOP_TOKEN_IDS}'"
            )
        arrays = {}
        for name, item in by_name.items():
            if item.datatype != "INT64" or any(d < 0 for d in item.shape) or len(item.shape) > 2:
                raise invalid(f"inference input '{name}' must be INT64 [n] or [1, n] for model '{model}'")
            expected = int(np.prod(item.shape, dtype=np.int64)) * 8
            if len(item.raw) != expected:
                raise invalid(f"input byte size mismatch for input '{name}' for model '{model}'")
            arrays[name] = np.frombuffer(item.raw, dtype="<i8").reshape(-1).tolist()
        params = sampling_of(parameters, arrays.get(InputTensor.STOP_TOKEN_IDS, []))
        return slot.batcher.submit(arrays[InputTensor.INPUT_IDS], params)

    def _observe(self, model: str, t: Timing) -> None:
        QUEUE_SECONDS.labels(model).observe((t.started_ns - t.enqueued_ns) / 1e9)
        EXECUTE_SECONDS.labels(model).observe((t.ended_ns - t.started_ns) / 1e9)
        BATCH_ROWS.labels(model).observe(t.batch_size)
        if not trace.get_current_span().is_recording():
            return
        # Spans are recorded after the fact with the batcher's timestamps (monotonic -> wall clock).
        offset = time.time_ns() - time.monotonic_ns()
        wait = self._tracer.start_span("queue_wait", start_time=t.enqueued_ns + offset, attributes={"model": model})
        wait.end(end_time=t.started_ns + offset)
        run = self._tracer.start_span(
            "batch_execute",
            start_time=t.started_ns + offset,
            attributes={"model": model, "batch_size": t.batch_size},
        )
        run.end(end_time=t.ended_ns + offset)


# Request parameter -> (SamplingParams field, type); unset ones keep SamplingParams' defaults.
_SAMPLING = {
    RequestParameter.MAX_TOKENS: ("max_new_tokens", int),
    RequestParameter.MIN_TOKENS: ("min_new_tokens", int),
    RequestParameter.TEMPERATURE: ("temperature", float),
    RequestParameter.TOP_P: ("top_p", float),
    RequestParameter.TOP_K: ("top_k", int),
    RequestParameter.SEED: ("seed", int),
    RequestParameter.REPETITION_PENALTY: ("repetition_penalty", float),
    RequestParameter.PROMPT_LOGPROBS: ("prompt_logprobs", bool),
    RequestParameter.MIN_P: ("min_p", float),
    RequestParameter.IGNORE_EOS: ("ignore_eos", bool),
    RequestParameter.FREQUENCY_PENALTY: ("frequency_penalty", float),
    RequestParameter.PRESENCE_PENALTY: ("presence_penalty", float),
    RequestParameter.LOGIT_BIAS: ("logit_bias", parse_logit_bias),  # a JSON object's text
    RequestParameter.LOGPROBS: ("logprobs", bool),
    RequestParameter.TOP_LOGPROBS: ("top_logprobs", int),
    RequestParameter.JSON_SCHEMA: ("json_schema", str),
}


def sampling_from_values(values: dict, stop_token_ids: list[int]) -> SamplingParams:
    """SamplingParams from request parameters given as plain values (other names are ignored)."""
    fields = {}
    for name, (field_name, kind) in _SAMPLING.items():
        if name in values:
            value = values[name]
            if kind not in (bool, int, float, str):  # a parser of its own
                fields[field_name] = kind(value)
                continue
            if kind is bool or kind is str:
                if not isinstance(value, kind):
                    what = "boolean" if kind is bool else "string"
                    raise invalid(f"request parameter '{name}' must be a {what}", param=name)
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise invalid(f"request parameter '{name}' must be a number", param=name)
            fields[field_name] = kind(value)
    return SamplingParams(**fields, stop_token_ids=tuple(stop_token_ids))


def sampling_of(parameters, stop_token_ids: list[int]) -> SamplingParams:
    """SamplingParams from a KServe request's `parameters` map (Triton's per-request parameters)."""
    values = {}
    for name in _SAMPLING.keys() & parameters.keys():
        which = parameters[name].WhichOneof("parameter_choice")
        if which:
            values[name] = getattr(parameters[name], which)
    return sampling_from_values(values, stop_token_ids)


def sampling_from_json(parameters: str, stop_token_ids: list[int]) -> SamplingParams:
    """SamplingParams from Triton's request parameters as the Python backend hands them (JSON)."""
    import json

    return sampling_from_values(json.loads(parameters or "{}"), stop_token_ids)

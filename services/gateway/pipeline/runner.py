"""The pipeline runner: catalog resolution, then preprocess -> inference -> postprocess.

Transport-neutral: the HTTP routes and the gRPC API call the same `Pipeline`. Large requests are
split by rows into chunks of the model's max batch size after preprocessing, run concurrently on
the inference service (where its dynamic batcher regroups them) and joined before postprocessing,
so one request can carry more texts than one model batch.

A catalog model that the inference server has not loaded (unloaded to free memory, or never
loaded) is cold: the first request for it starts a load (RepositoryModelLoad, on our server and on
Triton alike) and, as on the HF Inference API, is answered 503 with `estimated_time`, or waits
for the load when the caller asked `wait_for_model`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass

import numpy as np
from meshserve.postprocess.v1 import postprocess_pb2
from meshserve.preprocess.v1 import preprocess_pb2
from meshserve.tasks.v1 import tasks_pb2
from prometheus_client import Histogram
from tritonclient.grpc import service_pb2

from services.common import deadlines
from services.common.catalog import Catalog, ModelEntry
from services.common.clients import InferenceClient, PostprocessClient, PreprocessClient
from services.common.errors import ErrorCode, MeshError
from services.common.metrics import LATENCY_BUCKETS
from services.common.tasks import task_to_pb
from services.common.tensors import NP_DTYPES, from_pb

log = logging.getLogger(__name__)

# A sentence embedder's optional inference output (services/inference/runtime.py TOKEN_EMBEDDINGS:
# the services meet only over the contract, so the name is repeated here).
TOKEN_EMBEDDINGS = "token_embeddings"

# Tasks whose results quote the request's inputs (entity words, answer spans): postprocess gets them.
QUOTING_TASKS = frozenset({"token-classification", "question-answering"})

STAGE_SECONDS = Histogram(
    "meshserve_gateway_stage_seconds", "Time spent in each pipeline stage.", ["stage"], buckets=LATENCY_BUCKETS
)

_PRE, _INFER, _POST = (STAGE_SECONDS.labels(stage) for stage in ("preprocess", "inference", "postprocess"))


@dataclass(frozen=True)
class Prediction:
    model_id: str
    task: str
    result: tasks_pb2.TaskResult
    usage: tasks_pb2.Usage
    compute_s: float = 0.0  # time spent in the inference stage


@dataclass(frozen=True)
class TokenEmbeddings:
    """Each input's token embeddings [its tokens, hidden], its usage, time in the inference stage."""

    vectors: list[np.ndarray]
    usage: tasks_pb2.Usage
    compute_s: float = 0.0


@dataclass(frozen=True)
class Readiness:
    ready: bool
    checks: dict[str, bool]


class ColdStarts:
    """Loads cold models on the inference server, one load per model at a time, and estimates
    how long a load takes (the last measured load, else the catalog's expected_load_s)."""

    def __init__(self, inference: InferenceClient) -> None:
        self.inference = inference
        self._loads: dict[str, tuple[float, asyncio.Task]] = {}
        self._measured_s: dict[str, float] = {}

    def start(self, entry: ModelEntry) -> asyncio.Task:
        name = entry.inference.name
        running = self._loads.get(name)
        if running is not None and not running[1].done():
            return running[1]
        # An empty context: the load must not inherit (and die with) the first caller's deadline.
        task = asyncio.get_running_loop().create_task(self._load(name), context=contextvars.Context())
        self._loads[name] = (time.monotonic(), task)
        return task

    async def _load(self, name: str) -> None:
        started = time.monotonic()
        log.info("loading cold model", extra={"fields": {"model": name}})
        await self.inference.load_model(name)
        self._measured_s[name] = time.monotonic() - started

    def estimated_time_s(self, entry: ModelEntry) -> float:
        name = entry.inference.name
        expected = self._measured_s.get(name, entry.inference.expected_load_s)
        running = self._loads.get(name)
        elapsed = time.monotonic() - running[0] if running and not running[1].done() else 0.0
        return round(max(expected - elapsed, 0.5), 1)


def split_rows(tensor: tasks_pb2.Tensor, chunk: int) -> list[tuple[list[int], memoryview]]:
    """Split a row-major tensor into chunks of at most `chunk` rows, without copying bytes."""
    rows = tensor.shape[0]
    row_bytes = len(tensor.raw) // rows if rows else 0
    view = memoryview(tensor.raw)
    return [
        ([min(chunk, rows - start), *tensor.shape[1:]], view[start * row_bytes : (start + chunk) * row_bytes])
        for start in range(0, rows, chunk)
    ]


class Pipeline:
    def __init__(
        self,
        catalog: Catalog,
        preprocess: PreprocessClient,
        inference: InferenceClient,
        postprocess: PostprocessClient,
        *,
        readiness_cache_s: float = 1.0,
    ) -> None:
        self.catalog = catalog
        self.preprocess = preprocess
        self.inference = inference
        self.postprocess = postprocess
        self._readiness_cache_s = readiness_cache_s
        self._readiness: tuple[float, Readiness] | None = None
        self.cold_starts = ColdStarts(inference)

    def resolve(self, model_id: str, task: str | None) -> tuple[ModelEntry, str]:
        entry = self.catalog.get(model_id)
        return entry, self.catalog.resolve_task(entry, task)

    async def predict(
        self,
        model_id: str,
        task: str | None,
        inputs: tasks_pb2.TaskInputs,
        parameters: tasks_pb2.TaskParameters | None = None,
        *,
        wait_for_model: bool = False,
    ) -> Prediction:
        entry, task = self.resolve(model_id, task)
        try:
            return await self._run(entry, task, inputs, parameters or tasks_pb2.TaskParameters(), wait_for_model)
        except MeshError as err:
            if err.code is ErrorCode.UPSTREAM_UNAVAILABLE:
                self._readiness = None  # a hop is down: the next /readyz must look again
            raise

    async def _run(
        self,
        entry: ModelEntry,
        task: str,
        inputs: tasks_pb2.TaskInputs,
        parameters: tasks_pb2.TaskParameters,
        wait_for_model: bool,
    ) -> Prediction:
        task_pb = task_to_pb(task)
        started = time.perf_counter()
        pre = await self.preprocess.preprocess(
            preprocess_pb2.PreprocessRequest(model_id=entry.id, task=task_pb, inputs=inputs, parameters=parameters)
        )
        t1 = time.perf_counter()
        outputs = await self._infer_warm(entry, list(pre.tensors), wait_for_model)
        t2 = time.perf_counter()
        post = await self.postprocess.postprocess(
            postprocess_pb2.PostprocessRequest(
                model_id=entry.id,
                task=task_pb,
                outputs=outputs,
                parameters=parameters,
                side_tensors=pre.side_tensors,
                inputs=inputs if task in QUOTING_TASKS else None,
            )
        )
        t3 = time.perf_counter()
        _PRE.observe(t1 - started)
        _INFER.observe(t2 - t1)
        _POST.observe(t3 - t2)
        return Prediction(entry.id, task, post.result, pre.usage, t2 - t1)

    async def token_embeddings(
        self, model_id: str, inputs: tasks_pb2.TaskInputs, parameters: tasks_pb2.TaskParameters
    ) -> TokenEmbeddings:
        """TEI's /embed_all: the inputs preprocessed as feature-extraction, then only the model's
        `token_embeddings` output (never the pooled one), each input's rows cut to its own tokens
        with the attention mask preprocess made. No postprocess stage: nothing is pooled or scaled."""
        entry, task = self.resolve(model_id, "feature-extraction")
        started = time.perf_counter()
        pre = await self.preprocess.preprocess(
            preprocess_pb2.PreprocessRequest(
                model_id=entry.id, task=task_to_pb(task), inputs=inputs, parameters=parameters
            )
        )
        t1 = time.perf_counter()
        (hidden,) = await self._infer_warm(entry, list(pre.tensors), False, outputs=(TOKEN_EMBEDDINGS,))
        t2 = time.perf_counter()
        _PRE.observe(t1 - started)
        _INFER.observe(t2 - t1)
        mask = next(from_pb(t) for t in pre.tensors if t.name == "attention_mask").astype(bool)
        states = from_pb(hidden)
        return TokenEmbeddings([states[row][mask[row]] for row in range(mask.shape[0])], pre.usage, t2 - t1)

    async def _infer_warm(
        self, entry: ModelEntry, tensors: list[tasks_pb2.Tensor], wait_for_model: bool, *, outputs=None
    ) -> list[tasks_pb2.Tensor]:
        """Inference; a cold model is loaded first (waited for, or refused with its estimated time)."""
        try:
            return await self._infer(entry, tensors, outputs)
        except MeshError as err:
            if not await self._is_cold(entry, err):
                raise
            await self._warm_up(entry, wait_for_model)
            return await self._infer(entry, tensors, outputs)

    async def _is_cold(self, entry: ModelEntry, err: MeshError) -> bool:
        """The inference server is up but does not have this catalog model loaded. (Live, not
        ready: with strict readiness a server is not ready while any of its models is not.)"""
        if err.code not in (ErrorCode.MODEL_LOADING, ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.NOT_FOUND):
            return False
        return await self.inference.server_live() and not await self.inference.model_ready(entry.inference.name)

    async def _warm_up(self, entry: ModelEntry, wait: bool) -> None:
        """Start loading a cold model; wait for it (within the caller's deadline) or refuse with
        MODEL_LOADING and the estimated time."""
        load = self.cold_starts.start(entry)
        if not wait:
            estimate = self.cold_starts.estimated_time_s(entry)
            raise MeshError(
                ErrorCode.MODEL_LOADING,
                f"Model {entry.id} is currently loading",
                retry_after_s=estimate,
                estimated_time_s=estimate,
            )
        try:
            await asyncio.wait_for(asyncio.shield(load), deadlines.timeout_for(3600.0))
        except TimeoutError:
            raise MeshError(ErrorCode.DEADLINE_EXCEEDED, f"Model {entry.id} did not finish loading in time") from None

    async def _infer(
        self, entry: ModelEntry, tensors: list[tasks_pb2.Tensor], outputs: tuple[str, ...] | None = None
    ) -> list[tasks_pb2.Tensor]:
        """The model's `outputs` (default: the catalog's; a model may serve more on request, such
        as a sentence embedder's token embeddings, which would otherwise come along too)."""
        spec = entry.inference
        chunk = spec.max_batch_size
        parts = [split_rows(t, chunk) for t in tensors]
        wanted = outputs or tuple(t.name for t in spec.outputs)
        requests = []
        for i in range(len(parts[0])):
            request = service_pb2.ModelInferRequest(model_name=spec.name)
            for name in wanted:
                request.outputs.add(name=name)
            for tensor, pieces in zip(tensors, parts, strict=True):
                shape, raw = pieces[i]
                request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
                request.raw_input_contents.append(bytes(raw))
            requests.append(request)
        if len(requests) == 1:
            replies = [await self.inference.model_infer(requests[0])]
        else:
            replies = await asyncio.gather(*(self.inference.model_infer(r) for r in requests))
        return self._join(replies)

    @staticmethod
    def _join(replies: list[service_pb2.ModelInferResponse]) -> list[tasks_pb2.Tensor]:
        """Concatenate each output's chunks along the batch axis (raw bytes joined in order)."""
        first = replies[0]
        joined = []
        for i, out in enumerate(first.outputs):
            if out.datatype not in NP_DTYPES or len(first.raw_output_contents) <= i:
                raise MeshError(ErrorCode.INTERNAL, f"inference returned output '{out.name}' in an unsupported form")
            shape = list(out.shape)
            if any(list(r.outputs[i].shape[1:]) != shape[1:] for r in replies):
                # Joining raw bytes of chunks with different row shapes would scramble them.
                raise MeshError(
                    ErrorCode.INTERNAL, f"inference returned chunks of output '{out.name}' that differ in shape"
                )
            shape[0] = sum(r.outputs[i].shape[0] for r in replies)
            raw = (
                b"".join(r.raw_output_contents[i] for r in replies)
                if len(replies) > 1
                else first.raw_output_contents[i]
            )
            joined.append(tasks_pb2.Tensor(name=out.name, datatype=out.datatype, shape=shape, raw=raw))
        return joined

    async def model_ready(self, entry: ModelEntry) -> bool:
        return await self.inference.model_ready(entry.inference.name)

    async def readiness(self) -> Readiness:
        """Every downstream hop ready (cached briefly: balancers poll this often)."""
        now = time.monotonic()
        if self._readiness and now - self._readiness[0] < self._readiness_cache_s:
            return self._readiness[1]
        pre, post, infer = await asyncio.gather(
            self.preprocess.serving(), self.postprocess.serving(), self.inference.server_ready()
        )
        checks = {"preprocess": pre, "inference": infer, "postprocess": post}
        result = Readiness(all(checks.values()), checks)
        self._readiness = (now, result)
        return result

    async def close(self) -> None:
        await asyncio.gather(self.preprocess.close(), self.inference.close(), self.postprocess.close())

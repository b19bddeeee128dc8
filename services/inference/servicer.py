"""KServe v2 / Triton GRPCInferenceService over the embedded repository: pb <-> domain only."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from services.common.catalog import ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.common.generation_contract import OutputTensor, RequestParameter, ResponseParameter, Tensor
from services.common.tensors import NP_DTYPES, to_bytes
from services.inference.core import InferenceCore, InferInput
from services.inference.generation import GenerationStream
from services.inference.repository import ModelRepository, ModelState
from services.inference.stats import Duration, ModelStats

SERVER_NAME = "meshserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]
# When a request allows several tokens per response and more generations of its model run than
# this, its tokens go out every running // STREAMS_PER_STEP steps (send_interval): a decode step
# then costs about this many messages through the mesh, however large the batch.
STREAMS_PER_STEP = 2

# Typed `contents` fields of InferTensorContents, for callers that do not send raw bytes.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def inputs_from_pb(request: service_pb2.ModelInferRequest) -> list[InferInput]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            f"expected {len(request.inputs)} raw_input_contents, got {len(raw)}: send raw contents for "
            "every input or for none"
        )
    result = []
    for i, tensor in enumerate(request.inputs):
        if raw:
            data = raw[i]
        else:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            if field is None or tensor.datatype not in NP_DTYPES:
                raise invalid(f"input '{tensor.name}': datatype '{tensor.datatype}' needs raw_input_contents")
            data = np.asarray(getattr(tensor.contents, field), dtype=NP_DTYPES[tensor.datatype]).tobytes()
        result.append(InferInput(tensor.name, tensor.datatype, tuple(tensor.shape), data))
    return result


def _tensor_metadata(name: str, datatype: str, dims, batched: bool) -> service_pb2.ModelMetadataResponse.TensorMetadata:
    shape = [-1, *dims] if batched else list(dims)
    return service_pb2.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


def model_config_pb(entry: ModelEntry) -> model_config_pb2.ModelConfig:
    spec = entry.inference
    cfg = model_config_pb2.ModelConfig(
        name=spec.name,
        platform="meshserve_embedded",
        backend="meshserve",
        max_batch_size=spec.max_batch_size,
        input=[
            model_config_pb2.ModelInput(
                name=t.name,
                data_type=model_config_pb2.DataType.Value("TYPE_" + t.datatype.replace("BYTES", "STRING")),
                dims=list(t.dims),
            )
            for t in spec.inputs
        ],
        output=[
            model_config_pb2.ModelOutput(
                name=t.name,
                data_type=model_config_pb2.DataType.Value("TYPE_" + t.datatype.replace("BYTES", "STRING")),
                dims=list(t.dims),
            )
            for t in spec.outputs
        ],
        dynamic_batching=model_config_pb2.ModelDynamicBatching(
            preferred_batch_size=list(spec.preferred_batch_sizes),
            max_queue_delay_microseconds=spec.max_queue_delay_us,
        ),
        instance_group=[
            model_config_pb2.ModelInstanceGroup(
                name=spec.name, count=spec.instances, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU
            )
        ],
    )
    cfg.parameters["threads"].string_value = str(spec.threads)
    cfg.parameters["runtime"].string_value = spec.runtime
    if spec.runtime == "causal_lm":  # one response per token: Triton's decoupled transaction policy
        cfg.model_transaction_policy.decoupled = True
    return cfg


def _duration(d: Duration) -> service_pb2.StatisticDuration:
    return service_pb2.StatisticDuration(count=d.count, ns=d.ns)


def statistics_pb(name: str, version: str, s: ModelStats) -> service_pb2.ModelStatistics:
    return service_pb2.ModelStatistics(
        name=name,
        version=version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=service_pb2.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[
            service_pb2.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore, repository: ModelRepository, *, strict_readiness: bool = True) -> None:
        self.core = core
        self.repository = repository
        self.strict_readiness = strict_readiness
        self.running: dict[str, int] = {}  # generations streaming now, per model

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        ready = self.repository.all_ready() if self.strict_readiness else True
        return service_pb2.ServerReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        slot = self.repository.slot(request.name)
        ready = slot.state is ModelState.READY and (not request.version or request.version == slot.version)
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request, context):
        slot = self.repository.ready(request.name, request.version)
        spec = slot.entry.inference
        batched = spec.max_batch_size > 0
        return service_pb2.ModelMetadataResponse(
            name=spec.name,
            versions=[slot.version],
            platform="meshserve_embedded",
            inputs=[_tensor_metadata(t.name, t.datatype, t.dims, batched) for t in spec.inputs],
            outputs=[_tensor_metadata(t.name, t.datatype, t.dims, batched) for t in spec.outputs],
        )

    async def ModelConfig(self, request, context):
        slot = self.repository.ready(request.name, request.version)
        return service_pb2.ModelConfigResponse(config=model_config_pb(slot.entry))

    async def ModelInfer(self, request, context):
        result = await self.core.infer(
            request.model_name,
            request.model_version,
            inputs_from_pb(request),
            [o.name for o in request.outputs] or None,
        )
        response = service_pb2.ModelInferResponse(
            model_name=result.model_name, model_version=result.model_version, id=request.id
        )
        for out in result.outputs:
            response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            response.raw_output_contents.append(to_bytes(out.array))
        return response

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else list(self.repository.slots)
        stats = []
        for name in names:
            slot = self.repository.slot(name)
            if request.name and slot.state is not ModelState.READY:
                self.repository.ready(name, request.version)
            stats.append(statistics_pb(name, slot.version, slot.stats))
        return service_pb2.ModelStatisticsResponse(model_stats=stats)

    async def RepositoryIndex(self, request, context):
        models = []
        for name, slot in self.repository.slots.items():
            if request.ready and slot.state is not ModelState.READY:
                continue
            models.append(
                service_pb2.RepositoryIndexResponse.ModelIndex(
                    name=name, version=slot.version, state=slot.state.value, reason=slot.reason
                )
            )
        return service_pb2.RepositoryIndexResponse(models=models)

    async def SystemSharedMemoryStatus(self, request, context):
        # No region can be registered here (registration is not supported), so the status is empty.
        if request.name:
            raise MeshError(ErrorCode.NOT_FOUND, f"Unable to find system shared memory region: '{request.name}'")
        return service_pb2.SystemSharedMemoryStatusResponse()

    async def RepositoryModelLoad(self, request, context):
        await self.repository.load(request.model_name)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self.repository.unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()


def _unimplemented(method: str):
    async def handler(self, request_or_iterator, context):
        raise MeshError(
            ErrorCode.NOT_IMPLEMENTED,
            f"{method} is not supported by the meshserve embedded inference server",
        )

    handler.__name__ = method
    return handler


def _final_flag(response: service_pb2.ModelInferResponse, final: bool) -> None:
    response.parameters[ResponseParameter.TRITON_FINAL_RESPONSE].bool_param = final


def _output(response: service_pb2.ModelInferResponse, tensor: Tensor, shape: list[int]) -> None:
    response.outputs.add(name=tensor, datatype=tensor.datatype, shape=shape)


def stream_error(request, err: MeshError) -> service_pb2.ModelStreamInferResponse:
    """A failed request on the stream: Triton's `error_message`, and our code as a response
    parameter so that the gateway answers with the right status (a full queue is not a 400)."""
    response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
    response.parameters[ResponseParameter.ERROR_CODE].string_param = err.code.slug
    return service_pb2.ModelStreamInferResponse(error_message=err.message, infer_response=response)


def token_response(request, version: str, event) -> service_pb2.ModelStreamInferResponse:
    """One decoupled response: a token, the prompt's log-probabilities (when asked for), or the
    empty final response with the finish reason."""
    response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    if event.final:
        response.parameters[ResponseParameter.FINISH_REASON].string_param = event.finish_reason or ""
        response.parameters[ResponseParameter.PROMPT_TOKENS].int64_param = event.prompt_tokens
        response.parameters[ResponseParameter.COMPLETION_TOKENS].int64_param = event.completion_tokens
        if event.error:  # a failed decode step: the server's fault
            response.parameters[ResponseParameter.ERROR_CODE].string_param = ErrorCode.INTERNAL.slug
            return service_pb2.ModelStreamInferResponse(error_message=event.error, infer_response=response)
    elif event.prompt_logprobs is not None:  # the prompt's scores, before its first token
        scores = event.prompt_logprobs
        _output(response, OutputTensor.PROMPT_LOGPROBS, [len(scores)])
        response.raw_output_contents.append(struct.pack(f"<{len(scores)}f", *scores))
    else:
        return tokens_response(request, version, [event])
    _final_flag(response, event.final)
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def tokens_response(request, version: str, events: list) -> service_pb2.ModelStreamInferResponse:
    """One response with the tokens of `events` (one, as Triton, unless the request allowed more):
    `token_id` INT64 [n] and `logprob` FP32 [n]."""
    n = len(events)
    response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    _output(response, OutputTensor.TOKEN_ID, [n])
    _output(response, OutputTensor.LOGPROB, [n])
    response.raw_output_contents.extend(
        (struct.pack(f"<{n}q", *[e.token_id for e in events]), struct.pack(f"<{n}f", *[e.logprob for e in events]))
    )
    k = len(events[0].top or ())
    if k:  # the request asked for top_logprobs: INT64 [n, k] and FP32 [n, k]
        _output(response, OutputTensor.TOP_TOKEN_IDS, [n, k])
        _output(response, OutputTensor.TOP_LOGPROBS, [n, k])
        ids = [token for e in events for token, _ in e.top]
        scores = [score for e in events for _, score in e.top]
        response.raw_output_contents.extend((struct.pack(f"<{n * k}q", *ids), struct.pack(f"<{n * k}f", *scores)))
    _final_flag(response, False)
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def _drain(stream: GenerationStream, limit: int) -> list:
    """Up to `limit` events of the stream already queued, without waiting, up to and including
    the final one (the tokens a lagging reader has not taken yet, for one response)."""
    sequence = stream.sequence
    events, queue = [], sequence.events
    while len(events) < limit and not queue.empty():
        event = queue.get_nowait()
        events.append(event)
        if event.final:
            sequence.done = True  # as the stream's own iterator marks it
            break
    return events


def send_interval(running: int) -> int:
    """Tokens per response for one of `running` generations of a model (when its request allows
    several): 1 below 2 * STREAMS_PER_STEP streams (a lone stream gets every token at once), then
    one response per stream every running // STREAMS_PER_STEP steps, so a decode step costs about
    STREAMS_PER_STEP messages through the mesh however large the batch (the per-message cost of
    three gRPC hops, not the model, is what a large batch paid). The request's limit caps it."""
    return max(1, running // STREAMS_PER_STEP)


def tokens_per_response(request) -> int:
    """The request's `max_tokens_per_response` (1 when unset: one response per token, as Triton)."""
    parameter = request.parameters.get(RequestParameter.MAX_TOKENS_PER_RESPONSE)
    if parameter is None or parameter.WhichOneof("parameter_choice") is None:
        return 1
    value = getattr(parameter, parameter.WhichOneof("parameter_choice"))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(
            f"request parameter '{RequestParameter.MAX_TOKENS_PER_RESPONSE}' must be an integer >= 1",
            param=RequestParameter.MAX_TOKENS_PER_RESPONSE,
        )
    return value


_STARTED, _PUMP_DONE, _READ_DONE = object(), object(), object()  # markers on the response queue


class _StreamCalls:
    """The requests that one ModelStreamInfer call started: their tasks, their generations, and
    the queue where their responses and completion markers meet."""

    def __init__(self, servicer: InferenceServicer, context) -> None:
        self.servicer = servicer
        self.context = context
        self.out: asyncio.Queue = asyncio.Queue()
        self.streams = []
        self.tasks: set[asyncio.Task] = set()

    async def read(self, request_iterator) -> None:
        try:
            async for request in request_iterator:
                try:
                    self._start(request)
                    self.out.put_nowait(_STARTED)  # queued before its task can queue _PUMP_DONE
                except MeshError as err:
                    await self.out.put(stream_error(request, err))
        finally:
            self.out.put_nowait(_READ_DONE)

    def _start(self, request) -> None:
        slot = self.servicer.repository.ready(request.model_name, request.model_version)
        if slot.entry.inference.runtime == "causal_lm":
            limit = tokens_per_response(request)
            stream = self.servicer.core.generate(
                request.model_name, request.model_version, inputs_from_pb(request), request.parameters
            )
            self.streams.append(stream)
            self._spawn(self._pump(request, stream, limit))
        else:
            self._spawn(self._unary(request))

    async def _pump(self, request, stream, limit: int) -> None:
        """The stream's events as responses. With `limit` > 1, the tokens already queued when one
        arrives (the reader lags) go out in one response, and while many generations of the model
        run, each response waits for `send_interval` tokens. Responses ramp up: the first carries
        the first token alone and never waits, the k-th carries and waits for at most 2**k, so a
        first token with no text of its own (a lone space, part of a character) is followed within
        two steps, not send_interval, even when the engine ran ahead of this reader."""
        out, running, model = self.out, self.servicer.running, request.model_name
        running[model] = running.get(model, 0) + 1
        ramp = 1
        try:
            async for event in stream:
                if limit == 1 or event.token_id is None:
                    out.put_nowait(token_response(request, "1", event))
                    continue
                most = min(ramp, limit)  # the k-th response carries at most 2**k tokens
                events = [event, *_drain(stream, most - 1)]
                wanted = min(most, send_interval(running[model]))
                while len(events) < wanted and not events[-1].final:
                    events.append(await anext(stream))
                    events.extend(_drain(stream, wanted - len(events)))
                ramp = min(ramp * 2, limit)
                final = events.pop() if events[-1].final else None
                if events:
                    out.put_nowait(tokens_response(request, "1", events))
                if final is not None:
                    out.put_nowait(token_response(request, "1", final))
        finally:
            running[model] -= 1
            out.put_nowait(_PUMP_DONE)

    async def _unary(self, request) -> None:
        try:
            response = await self.servicer.ModelInfer(request, self.context)
            await self.out.put(service_pb2.ModelStreamInferResponse(infer_response=response))
        except MeshError as err:
            await self.out.put(stream_error(request, err))
        finally:
            self.out.put_nowait(_PUMP_DONE)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()  # the client went away (or the stream ended): stop generating
        for task in list(self.tasks):
            task.cancel()


async def _model_stream_infer(self, request_iterator, context):
    """Bidirectional streaming, as Triton: a decoupled (generation) model answers each request with
    one response per token (several when the request sets `max_tokens_per_response`: see _pump)
    and an empty final response (`triton_final_response`); any other model
    answers each request with one response. A failed request gets a response with `error_message`;
    the stream goes on. A client that goes away cancels every generation it started.

    One queue carries responses and completion markers, so the loop sleeps in `Queue.get()` until
    there is something to send (no polling: a spinning loop would hold the GIL that the decode
    thread needs)."""
    calls = _StreamCalls(self, context)
    reader = asyncio.create_task(calls.read(request_iterator))
    reading, running = True, 0
    try:
        while reading or running:
            item = await calls.out.get()
            if item is _READ_DONE:
                reading = False
                reader.result()  # surface a broken request stream
            elif item is _PUMP_DONE:
                running -= 1
            elif item is _STARTED:
                running += 1
            else:
                yield item
    finally:
        reader.cancel()
        calls.cancel()


InferenceServicer.ModelStreamInfer = _model_stream_infer
for _method in (
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
):
    setattr(InferenceServicer, _method, _unimplemented(_method))

"""KServe v2 over HTTP/REST for the embedded inference server, with the Triton extensions that
`tritonclient.http` relies on (binary tensor data, model configuration, model repository,
statistics): the same InferenceServicer and InferenceCore as gRPC behind a Starlette app, served by
uvicorn on the gRPC server's event loop, sharing its drain and its service token.

Errors are KServe's `{"error": "..."}` with the error catalog's HTTP status (400 bad input, 404
unknown model, 401 no service token, 503 draining). Health and readiness need no token, as on gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import uvicorn
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tritonclient.grpc import service_pb2

from services.common import service_auth, tracing
from services.common.errors import ErrorCode, MeshError, invalid
from services.common.grpc_server import Drain
from services.common.tensors import NP_DTYPES, to_bytes
from services.inference.core import InferenceCore, InferInput, InferResult
from services.inference.servicer import InferenceServicer

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"  # Triton's binary tensor data extension
_REFUSAL = MeshError(ErrorCode.UNAUTHENTICATED, "this service requires the mesh's service token")
_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
Handler = Callable[[Request], Awaitable[Response]]


# --- protobuf answers as Triton writes them over HTTP -------------------------------------------


def message_json(message) -> dict:
    """A protobuf message as Triton's HTTP endpoint writes it: proto field names, every field, and
    64-bit integers as JSON numbers (protobuf's JSON mapping writes them as strings)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(message.DESCRIPTOR, data)


def _numbers(descriptor, data: dict) -> dict:
    for field in descriptor.fields:
        if field.name in data:
            data[field.name] = _field_numbers(field, data[field.name])
    return data


def _field_numbers(field, value):
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        inner = field.message_type.fields_by_name["value"]
        return {key: _one_number(inner, item) for key, item in value.items()}
    if isinstance(value, list):
        return [_one_number(field, item) for item in value]
    return _one_number(field, value)


def _one_number(field, value):
    if field.message_type is not None:
        return _numbers(field.message_type, value) if isinstance(value, dict) else value
    return int(value) if field.cpp_type in _INT64 else value


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(err: MeshError) -> Response:
    return _json({"error": err.message}, err.code.http_status)


# --- inference requests: JSON tensors and Triton's binary tensor data ---------------------------


class TensorIn(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class TensorOut(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class InferRequestBody(BaseModel):
    """The JSON part of a KServe v2 inference request (fields we do not use are ignored)."""

    id: str = ""
    parameters: dict[str, Any] = {}
    inputs: list[TensorIn]
    outputs: list[TensorOut] = []


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferRequestBody, memoryview]:
    """The request's JSON header and the binary data after it (`Inference-Header-Content-Length`)."""
    view = memoryview(body)
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise invalid("Inference-Header-Content-Length must be an integer") from None
        if not 0 <= size <= len(body):
            raise invalid(f"Inference-Header-Content-Length {size} is outside the body's {len(body)} bytes")
    try:
        request = InferRequestBody.model_validate_json(body if size == len(body) else body[:size])
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:3])
        raise invalid(f"malformed inference request: {problems}") from None
    return request, view[size:]


def infer_inputs(request: InferRequestBody, binary: memoryview) -> list[InferInput]:
    """The inputs as the core takes them: raw little-endian bytes from the binary data (no copy)
    or encoded from the JSON `data`."""
    offset, inputs = 0, []
    for tensor in request.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise invalid(f"input '{tensor.name}': binary_data_size {size!r} exceeds the request's binary data")
            raw = binary[offset : offset + size]
            offset += size
        elif "shared_memory_region" in tensor.parameters:
            raise invalid(f"input '{tensor.name}': shared memory is not supported by the meshserve embedded server")
        else:
            raw = _json_data(tensor)
        inputs.append(InferInput(tensor.name, tensor.datatype, tuple(tensor.shape), raw))
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data belong to no input")
    return inputs


def _json_data(tensor: TensorIn) -> bytes:
    if tensor.data is None:
        raise invalid(f"input '{tensor.name}' has neither 'data' nor a binary_data_size parameter")
    try:
        if tensor.datatype == "BYTES":  # Triton's serialization: a 4-byte length before each element
            items = [x if isinstance(x, bytes) else str(x).encode() for x in np.asarray(tensor.data, object).flat]
            return b"".join(struct.pack("<I", len(x)) + x for x in items)
        dtype = NP_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise invalid(f"input '{tensor.name}': unsupported datatype '{tensor.datatype}'")
        return to_bytes(np.asarray(tensor.data, dtype=dtype).reshape(-1))
    except (TypeError, ValueError, OverflowError):
        raise invalid(f"input '{tensor.name}': 'data' does not hold {tensor.datatype} values") from None


def infer_response(request: InferRequestBody, result: InferResult) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): outputs asked for as binary data (each output's
    `binary_data` parameter, else the request's `binary_data_output`) follow the JSON header."""
    wanted = {o.name: o.parameters for o in request.outputs}
    default_binary = bool(request.parameters.get("binary_data_output", False))
    outputs, chunks = [], []
    for out in result.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if wanted.get(out.name, {}).get("binary_data", default_binary):
            raw = to_bytes(out.array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = np.ascontiguousarray(out.array).reshape(-1)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
    if request.id:
        body["id"] = request.id
    body["outputs"] = outputs
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return (header + b"".join(chunks), len(header)) if chunks else (header, None)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed (tritonclient's request_compression_algorithm), at most
    `limit` bytes before and after decompression (PAYLOAD_TOO_LARGE beyond)."""
    too_large = MeshError(ErrorCode.PAYLOAD_TOO_LARGE, f"request body larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise MeshError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"unsupported Content-Encoding '{encoding[:40]}'")
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)  # deflate: the zlib format
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise invalid(f"the request body is not valid {encoding} data") from None
    if len(plain) > limit or inflater.unconsumed_tail:
        raise too_large
    return plain


def response_encoding(accept: str | None) -> str | None:
    """gzip or deflate when the caller asks for exactly that one (tritonclient's
    response_compression_algorithm); a list such as aiohttp's default "gzip, deflate" gets the
    identity encoding, which HTTP always allows, so only callers who chose it pay for compression."""
    value = (accept or "").strip().lower()
    return value if value in ("gzip", "deflate") else None


def _compressed(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        import gzip

        return gzip.compress(body, compresslevel=6)
    return zlib.compress(body) if encoding == "deflate" else body


# --- the routes ----------------------------------------------------------------------------------


class KServeHttp:
    """The route handlers: HTTP <-> the servicer's messages or the core's domain objects."""

    def __init__(self, servicer: InferenceServicer, drain: Drain, token: str | None, max_body_bytes: int) -> None:
        self.servicer = servicer
        self.core: InferenceCore = servicer.core
        self.drain = drain
        self.token = token
        self.max_body_bytes = max_body_bytes

    def endpoint(self, handler: Handler, *, open_: bool = False) -> Handler:
        """The handler behind the token check (health excepted), counted by the drain (a
        draining server answers 503), with MeshErrors as KServe errors."""

        async def call(request: Request) -> Response:
            if not open_ and self.token and not service_auth.presents(request.headers.items(), self.token):
                return _error(_REFUSAL)
            entered = False
            try:
                if not open_:
                    self.drain.enter()
                    entered = True
                return await handler(request)
            except MeshError as err:
                return _error(err)
            except Exception:
                log.exception("unhandled error in %s", request.url.path[:200])
                return _error(MeshError(ErrorCode.INTERNAL, "internal error"))
            finally:
                if entered:
                    self.drain.leave()

        return call

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        reply = await self.servicer.ServerReady(service_pb2.ServerReadyRequest(), None)
        ready = reply.ready and not self.drain.draining
        return _json({"ready": ready}, 200 if ready else 400)

    async def server_metadata(self, request: Request) -> Response:
        return _json(message_json(await self.servicer.ServerMetadata(service_pb2.ServerMetadataRequest(), None)))

    async def model_ready(self, request: Request) -> Response:
        name, version = _model(request)
        reply = await self.servicer.ModelReady(service_pb2.ModelReadyRequest(name=name, version=version), None)
        return _json({"ready": reply.ready}, 200 if reply.ready else 400)

    async def model_metadata(self, request: Request) -> Response:
        name, version = _model(request)
        reply = await self.servicer.ModelMetadata(service_pb2.ModelMetadataRequest(name=name, version=version), None)
        return _json(message_json(reply))

    async def model_config(self, request: Request) -> Response:
        name, version = _model(request)
        reply = await self.servicer.ModelConfig(service_pb2.ModelConfigRequest(name=name, version=version), None)
        return _json(message_json(reply.config))  # Triton's HTTP answer is the bare config

    async def statistics(self, request: Request) -> Response:
        name, version = _model(request)
        stats = service_pb2.ModelStatisticsRequest(name=name, version=version)
        return _json(message_json(await self.servicer.ModelStatistics(stats, None)))

    async def infer(self, request: Request) -> Response:
        name, version = _model(request)
        body = await read_body(request, self.max_body_bytes)
        parsed, binary = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
        if any(o.parameters.get("classification") for o in parsed.outputs):
            raise invalid("the classification extension is not supported by the meshserve embedded server")
        requested = [o.name for o in parsed.outputs] or None
        result = await self.core.infer(name, version, infer_inputs(parsed, binary), requested)
        content, header_length = infer_response(parsed, result)
        headers = {}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        encoding = response_encoding(request.headers.get("accept-encoding"))
        if encoding:
            headers["Content-Encoding"] = encoding
        media = "application/octet-stream" if header_length is not None else "application/json"
        return Response(_compressed(content, encoding), headers=headers, media_type=media)

    async def repository_index(self, request: Request) -> Response:
        options = await _json_body(request, self.max_body_bytes)
        ready = options.get("ready", False)
        reply = await self.servicer.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=ready is True), None)
        return _json([message_json(m) for m in reply.models])

    async def load(self, request: Request) -> Response:
        await _json_body(request, self.max_body_bytes)
        load = service_pb2.RepositoryModelLoadRequest(model_name=request.path_params["name"])
        await self.servicer.RepositoryModelLoad(load, None)
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        await _json_body(request, self.max_body_bytes)
        unload = service_pb2.RepositoryModelUnloadRequest(model_name=request.path_params["name"])
        await self.servicer.RepositoryModelUnload(unload, None)
        return Response(status_code=200)

    async def shared_memory_status(self, request: Request) -> Response:
        status = service_pb2.SystemSharedMemoryStatusRequest(name=request.path_params.get("region", ""))
        reply = await self.servicer.SystemSharedMemoryStatus(status, None)
        return _json([message_json(region) for region in reply.regions.values()])

    def unsupported(self, method: str) -> Handler:
        async def handler(request: Request) -> Response:
            await getattr(self.servicer, method)(None, None)  # raises NOT_IMPLEMENTED, as on gRPC
            return Response(status_code=501)

        return handler


def _model(request: Request) -> tuple[str, str]:
    return request.path_params.get("name", ""), request.path_params.get("version", "")


async def _json_body(request: Request, limit: int) -> dict:
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid("the request body is not JSON") from None
    if not isinstance(value, dict):
        raise invalid("the request body must be a JSON object")
    return value


def routes(api: KServeHttp) -> list[Route]:
    """KServe v2's REST paths and Triton's extensions, as tritonclient.http calls them."""
    table: list[tuple[str, Handler, str, bool]] = [
        ("/v2/health/live", api.live, "GET", True),
        ("/v2/health/ready", api.ready, "GET", True),
        ("/v2", api.server_metadata, "GET", False),
        ("/v2/models/stats", api.statistics, "GET", False),
        ("/v2/repository/index", api.repository_index, "POST", False),
        ("/v2/repository/models/{name}/load", api.load, "POST", False),
        ("/v2/repository/models/{name}/unload", api.unload, "POST", False),
        ("/v2/systemsharedmemory/status", api.shared_memory_status, "GET", False),
        ("/v2/systemsharedmemory/region/{region}/status", api.shared_memory_status, "GET", False),
    ]
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        table += [
            (model, api.model_metadata, "GET", False),
            (f"{model}/ready", api.model_ready, "GET", True),
            (f"{model}/config", api.model_config, "GET", False),
            (f"{model}/stats", api.statistics, "GET", False),
            (f"{model}/infer", api.infer, "POST", False),
        ]
    unsupported = {
        "/v2/systemsharedmemory/region/{region}/register": "SystemSharedMemoryRegister",
        "/v2/systemsharedmemory/region/{region}/unregister": "SystemSharedMemoryUnregister",
        "/v2/systemsharedmemory/unregister": "SystemSharedMemoryUnregister",
        "/v2/cudasharedmemory/status": "CudaSharedMemoryStatus",
        "/v2/cudasharedmemory/region/{region}/status": "CudaSharedMemoryStatus",
        "/v2/cudasharedmemory/region/{region}/register": "CudaSharedMemoryRegister",
        "/v2/cudasharedmemory/region/{region}/unregister": "CudaSharedMemoryUnregister",
        "/v2/cudasharedmemory/unregister": "CudaSharedMemoryUnregister",
        "/v2/trace/setting": "TraceSetting",
        "/v2/models/{name}/trace/setting": "TraceSetting",
        "/v2/logging": "LogSettings",
    }
    table += [(path, api.unsupported(method), "GET|POST", False) for path, method in unsupported.items()]
    return [
        Route(path, api.endpoint(handler, open_=open_), methods=methods.split("|"))
        for path, handler, methods, open_ in table
    ]


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _json({"error": exc.detail}, exc.status_code)


def build_app(servicer: InferenceServicer, drain: Drain, token: str | None, max_body_bytes: int):
    """The ASGI app: KServe routes, unknown paths and methods answered as KServe errors, and
    OpenTelemetry's ASGI middleware when tracing is on (health and readiness untraced)."""
    api = KServeHttp(servicer, drain, token, max_body_bytes)
    app = Starlette(routes=routes(api), exception_handlers={HTTPException: _http_error})
    provider = tracing.setup_tracing("inference")
    if provider is None:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, excluded_urls="v2/health,/ready$", tracer_provider=provider)


# --- the server ----------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn on a loop it does not own: the process's handlers (grpc_server.serve_until_signal)
    take SIGTERM and SIGINT and stop this server in turn; uvicorn's own would replace them and
    re-raise the signal once it stopped."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class HttpServer:
    server: uvicorn.Server
    task: asyncio.Task
    port: int

    async def stop(self) -> None:
        """Stop accepting; in-flight requests finish (up to the server's graceful-shutdown time)."""
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot bind {host}:{port} for KServe HTTP: {err.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def start_http(settings, servicer: InferenceServicer, drain: Drain, token: str | None) -> HttpServer | None:
    """Serve KServe v2 HTTP on settings.http_port (None when it is -1), on this event loop."""
    if settings.http_port < 0:
        return None
    sock = _bind(settings.host, settings.http_port)
    app = build_app(servicer, drain, token, settings.max_message_bytes)
    config = uvicorn.Config(
        app,
        loop="none",
        lifespan="off",
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn exposes a flag, not an event)
        await asyncio.sleep(0.01)
    if task.done():
        task.result()  # the reason it could not start
        raise RuntimeError("the KServe HTTP server stopped as it started")
    port = sock.getsockname()[1]
    log.info("kserve http listening", extra={"fields": {"address": f"{settings.host}:{port}"}})
    return HttpServer(server, task, port)

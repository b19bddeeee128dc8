"""Transport limits through real servers: metric labels only from served methods (a caller's
made-up gRPC method name never becomes a series), HTTP header size and header/idle timeouts on
the gateway's uvicorn server, gRPC message sizes on the gateway's API and between services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import NamedTuple

import grpc
import pytest
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2
from prometheus_client import REGISTRY

from services.common import grpc_server
from services.common.clients import channel_options
from services.common.settings import GrpcServiceSettings, UpstreamSettings
from services.gateway.main import SERVICE_NAME, Gateway
from services.gateway.settings import GatewaySettings

ADMIN_TOKEN = "msk_admin_" + "transport-limits-test-token-0123456789"
HEADER_LIMIT = 16 * 1024
SHORT_S = 0.5  # the test gateway's header and keep-alive timeouts
PATIENCE_S = 20.0  # how long a test waits for the server to close a connection (>> SHORT_S)
MiB = 1024 * 1024


def series(service: str) -> set[tuple[str, ...]]:
    """(metric, method, code) of every gRPC server series of one service label."""
    found = set()
    for metric in REGISTRY.collect():
        if not metric.name.startswith("meshserve_grpc_server_"):
            continue
        for sample in metric.samples:
            if sample.labels.get("service") == service:
                found.add((metric.name, sample.labels["method"], sample.labels.get("code", "")))
    return found


async def call_made_up_methods(channel: grpc.aio.Channel, count: int, metadata=()) -> set[grpc.StatusCode]:
    codes = set()
    for i in range(count):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(f"/x.Y/Made{i}")(b"", metadata=metadata, timeout=10)
        codes.add(err.value.code())
    return codes


# -- metrics labels --------------------------------------------------------------------------------


async def test_made_up_grpc_methods_create_no_metric_series():
    service = "limits-plain"
    running = await grpc_server.create_server(
        GrpcServiceSettings(grpc_port=0, metrics_port=-1),
        service,
        [
            grpc_server.Binding(
                gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
                gateway_pb2_grpc.GatewayServiceServicer(),
                SERVICE_NAME,
            )
        ],
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            assert await call_made_up_methods(channel, 20) == {grpc.StatusCode.UNIMPLEMENTED}
            with pytest.raises(grpc.aio.AioRpcError):  # a served method, unimplemented by the base servicer
                await channel.unary_unary(f"/{SERVICE_NAME}/ListModels")(b"", timeout=10)
    finally:
        await running.stop(0)
    methods = {method for _, method, _ in series(service)}
    assert methods == {"ListModels"}


def conventional(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_calls_are_also_counted_under_the_conventional_grpc_names_and_labels():
    """go-grpc-prometheus's series, which community gRPC dashboards query: the RPC's type, full
    service name and method; a made-up method that nothing answers is not counted."""
    running = await grpc_server.create_server(
        GrpcServiceSettings(grpc_port=0, metrics_port=-1),
        "conventional-labels",
        [
            grpc_server.Binding(
                gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
                gateway_pb2_grpc.GatewayServiceServicer(),
                SERVICE_NAME,
            )
        ],
    )
    unary = {"grpc_type": "unary", "grpc_service": SERVICE_NAME, "grpc_method": "ListModels"}
    stream = {"grpc_type": "server_stream", "grpc_service": SERVICE_NAME, "grpc_method": "Generate"}
    unknown = {"grpc_type": "unary", "grpc_service": "unknown", "grpc_method": "unknown"}
    names = ("grpc_server_started_total", "grpc_server_handling_seconds_count")
    before = {(n, k): conventional(n, **v) for n in names for k, v in (("u", unary), ("s", stream), ("x", unknown))}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError):  # served, unimplemented by the base servicer
                    await channel.unary_unary(f"/{SERVICE_NAME}/ListModels")(b"", timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in channel.unary_stream(f"/{SERVICE_NAME}/Generate")(b"", timeout=10):
                    pass
            await call_made_up_methods(channel, 3)
    finally:
        await running.stop(0)
    deltas = {key: conventional(key[0], **dict(u=unary, s=stream, x=unknown)[key[1]]) - v for key, v in before.items()}
    assert deltas == {(n, k): c for n in names for k, c in (("u", 2), ("s", 1), ("x", 0))}
    # The same status codes as our own series of this server (its service label is ours alone).
    (code,) = [c for m, method, c in series("conventional-labels") if method == "ListModels" and c]
    assert conventional("grpc_server_handled_total", **unary, grpc_code=code) >= 2
    made_up = [
        s for m in REGISTRY.collect() if m.name.startswith("grpc_server_") for s in m.samples
        if "Made" in s.labels.get("grpc_method", "") or s.labels.get("grpc_service") == "x.Y"
    ]  # fmt: skip
    assert not made_up


class Served(NamedTuple):
    gw: Gateway
    http_port: int


@contextlib.asynccontextmanager
async def serve_http(gw: Gateway):
    """The gateway's uvicorn server on a free loopback port, until the block ends."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        serving = asyncio.create_task(gw.http.serve(sockets=[sock]))
        while not gw.http.started:  # noqa: ASYNC110 (uvicorn exposes a flag, not an event)
            await asyncio.sleep(0.01)
        try:
            yield sock.getsockname()[1]
        finally:
            gw.http.should_exit = True
            await serving


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory):
    """The gateway built as main() builds it (auth on), HTTP and gRPC on free loopback ports; no
    upstreams (their channels connect lazily)."""
    settings = GatewaySettings(
        home=str(tmp_path_factory.mktemp("gateway")),
        grpc_port=0,
        admin_token=ADMIN_TOKEN,
        ledger=False,
        max_header_bytes=HEADER_LIMIT,
        header_timeout_s=SHORT_S,
        keep_alive_timeout_s=SHORT_S,
    )
    gw = Gateway(settings)
    await gw.control.start(settings)
    await gw.start_grpc()
    async with serve_http(gw) as port:
        yield Served(gw, port)
    await gw.grpc.stop(0)
    await gw.control.close()
    await gw.pipeline.close()


async def test_made_up_methods_on_the_gateways_authenticated_port_share_one_label(gateway):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.gw.grpc.port}") as channel:
        assert await call_made_up_methods(channel, 20) == {grpc.StatusCode.UNAUTHENTICATED}
        admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        assert await call_made_up_methods(channel, 20, admin) == {grpc.StatusCode.UNIMPLEMENTED}
    found = series("gateway")
    assert not [s for s in found if "Made" in s[1]]
    unknown = [s for s in found if s[1] == grpc_server.UNKNOWN_METHOD]
    assert sorted(unknown) == [
        ("meshserve_grpc_server_handled", "unknown", "UNAUTHENTICATED"),
        ("meshserve_grpc_server_handling_seconds", "unknown", ""),
    ]


# -- HTTP -----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connection(served: Served):
    reader, writer = await asyncio.open_connection("127.0.0.1", served.http_port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PATIENCE_S)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
    )
    return status, await asyncio.wait_for(reader.readexactly(length), PATIENCE_S)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the server closes the connection (EOF or reset) while we wait, patiently."""
    try:
        return await asyncio.wait_for(reader.read(1), PATIENCE_S) == b""
    except ConnectionResetError:
        return True


def get(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: gw", *headers, "", ""]).encode()


async def test_a_normal_request_passes_and_its_connection_is_kept_alive(gateway):
    async with connection(gateway) as (reader, writer):
        for _ in range(3):
            writer.write(get("/health", "X-Fill: " + "a" * (HEADER_LIMIT // 2)))
            status, body = await read_response(reader)
            assert status == 200, body


async def test_a_large_body_after_small_headers_is_not_taken_for_headers(gateway):
    body = b'{"inputs": "' + b"x" * (4 * HEADER_LIMIT) + b'"}'
    head = f"POST /models/no/such-model HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n"
    head += f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n\r\n"
    async with connection(gateway) as (reader, writer):
        writer.write(head.encode() + body)  # one write: headers and body share the server's reads
        status, reply = await read_response(reader)
    assert status == 404, reply


@pytest.mark.parametrize("size", [HEADER_LIMIT + 1024, 4 * MiB], ids=["just-over", "4MiB"])
async def test_oversized_headers_are_refused_with_431(gateway, size):
    async with connection(gateway) as (reader, writer):
        writer.write(get("/v1/models", "X-Big: " + "a" * size))
        status, body = await read_response(reader)
        assert status == 431
        assert b"exceed the limit of 16384 bytes" in body
        assert b'"type"' in body  # an OpenAI route: the OpenAI error shape
        assert await closed_by_server(reader)


async def test_oversized_headers_pipelined_behind_a_request_are_refused(gateway):
    async with connection(gateway) as (reader, writer):
        writer.write(get("/health") + get("/health", "X-Big: " + "a" * (HEADER_LIMIT + 1024)))  # one write
        assert (await read_response(reader))[0] == 200  # the response going out ends; no second one
        assert await closed_by_server(reader)


async def test_headers_sent_in_part_are_cut_off_after_the_header_timeout(gateway):
    async with connection(gateway) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Slow: abc")
        assert await closed_by_server(reader)


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(gateway):
    async with connection(gateway) as (reader, _writer):
        assert await closed_by_server(reader)


async def test_an_idle_keep_alive_connection_is_closed(gateway):
    async with connection(gateway) as (reader, writer):
        writer.write(get("/health"))
        status, _ = await read_response(reader)
        assert status == 200
        assert await closed_by_server(reader)


async def test_blank_lines_after_a_response_do_not_keep_the_connection_open(gateway):
    async with connection(gateway) as (reader, writer):
        writer.write(get("/health"))
        status, _ = await read_response(reader)
        assert status == 200
        writer.write(b"\r\n")  # any byte stops uvicorn's keep-alive timer; it begins no request
        assert await closed_by_server(reader)


async def test_a_request_beyond_the_connection_cap_gets_503(tmp_path):
    settings = GatewaySettings(home=str(tmp_path), auth=False, ledger=False, max_connections=2)
    gw = Gateway(settings)
    async with serve_http(gw) as port:
        served = Served(gw, port)
        async with connection(served), connection(served) as (reader, writer):
            writer.write(get("/health"))
            assert (await read_response(reader))[0] == 200  # two connections: both served
            # A third: the house OVERLOADED error in the caller's dialect, Retry-After, then the close.
            for path in ("/v1/embeddings", "/models/m"):
                async with connection(served) as (third_reader, third):
                    third.write(get(path))
                    head = (await asyncio.wait_for(third_reader.readuntil(b"\r\n\r\n"), PATIENCE_S)).lower()
                    assert head.startswith(b"http/1.1 503 ")
                    assert b"\r\ncontent-type: application/json" in head and b"\r\nretry-after: 1\r\n" in head
                    error = json.loads(await asyncio.wait_for(third_reader.read(), PATIENCE_S))  # read to EOF
                    if path.startswith("/v1/"):
                        assert error["error"]["code"] == "overloaded"
                        assert error["error"]["type"] == "service_unavailable"
                        assert "connection limit" in error["error"]["message"]
                    else:
                        assert error["error_type"] == "overloaded" and "connection limit" in error["error"]
            writer.write(get("/health"))
            assert (await read_response(reader))[0] == 200
    await gw.pipeline.close()


# -- gRPC message sizes ---------------------------------------------------------------------------


def predict(image_bytes: int) -> gateway_pb2.PredictRequest:
    inputs = tasks_pb2.TaskInputs(images=tasks_pb2.ImageInputs(images=[b"\0" * image_bytes]))
    return gateway_pb2.PredictRequest(model_id="no/such-model", inputs=inputs)


async def test_the_gateways_grpc_api_takes_messages_as_large_as_rest_bodies_and_no_larger(gateway):
    limit = gateway.gw.settings.max_body_bytes
    admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.gw.grpc.port}") as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(predict(limit - 1024), metadata=admin, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # it reached the gateway: no such model
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(predict(limit + 1), metadata=admin, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _add_echo(servicer, server) -> None:
    async def echo(request: bytes, context) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("meshserve.test.Echo", {"Echo": handler})])


async def test_internal_hops_carry_a_largest_rest_body_but_have_a_limit():
    """A REST body of the largest size crosses gateway -> preprocess with framing around it (and
    preprocess answers with tensors as large): the services' default limit has room for both."""
    running = await grpc_server.create_server(
        GrpcServiceSettings(grpc_port=0, metrics_port=-1), "limits-echo", [grpc_server.Binding(_add_echo, None, "x")]
    )
    upstream = UpstreamSettings(address=f"127.0.0.1:{running.port}")
    try:
        async with grpc.aio.insecure_channel(upstream.address, options=channel_options(upstream)) as channel:
            echo = channel.unary_unary("/meshserve.test.Echo/Echo")
            largest = b"\0" * (GatewaySettings().max_body_bytes + MiB)
            assert await echo(largest, timeout=30) == largest
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await echo(b"\0" * (upstream.max_message_bytes + 1), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await running.stop(0)


async def test_the_largest_text_request_crosses_the_preprocess_hop_with_default_limits(tmp_path):
    """The catalog's largest tokenized output (max_items texts padded to max_length, int64 ids and
    mask) is the biggest message between services: it fits the services' default limit. A real
    preprocess server (as `create` builds it) over a one-model catalog; the gateway's client."""
    import yaml
    from meshserve.preprocess.v1 import preprocess_pb2

    from services.common.catalog import Catalog
    from services.common.clients import PreprocessClient
    from services.common.settings import REPO_ROOT
    from services.models.build import build_entry
    from services.preprocess.main import create
    from services.preprocess.settings import PreprocessSettings
    from tests.helpers import MODEL_ID, meshserve_home

    entries = yaml.safe_load((REPO_ROOT / "catalog.yaml").read_text())["models"]
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"models": [e for e in entries if e["id"] == MODEL_ID]}))
    catalog = Catalog.load(tmp_path / "catalog.yaml")
    build_entry(catalog.get(MODEL_ID), meshserve_home() / "models", catalog=catalog)  # cached: a no-op when built
    spec = catalog.get(MODEL_ID).preprocess
    inputs = tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=["word " * spec.max_length] * spec.max_items))
    request = preprocess_pb2.PreprocessRequest(model_id=MODEL_ID, task=tasks_pb2.TASK_FEATURE_EXTRACTION, inputs=inputs)
    assert request.ByteSize() < GatewaySettings().max_body_bytes  # a body the gateway accepts
    settings = PreprocessSettings(
        home=meshserve_home(), catalog=tmp_path / "catalog.yaml", grpc_port=0, metrics_port=-1
    )
    running = await create(settings)
    client = PreprocessClient(UpstreamSettings(address=f"127.0.0.1:{running.port}"))
    try:
        reply = await client.preprocess(request)
    finally:
        await client.close()
        await running.stop(0)
    assert [tuple(t.shape) for t in reply.tensors] == [(spec.max_items, spec.max_length)] * 2
    assert reply.ByteSize() > GatewaySettings().max_body_bytes  # larger than what callers may send

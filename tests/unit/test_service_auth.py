"""The service-token check through a real grpc.aio server built by `create_server` (the production
interceptor chain), called over real channels: with and without the token, for every kind of call,
and what a refused call leaves behind (no handler run, no metric series)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from meshserve.preprocess.v1 import preprocess_pb2
from prometheus_client import REGISTRY, generate_latest

from services.common import grpc_server, service_auth
from services.common.clients import PreprocessClient, UpstreamClient
from services.common.errors import ErrorCode, MeshError
from services.common.settings import GrpcServiceSettings, UpstreamSettings
from tests.helpers import free_port

TOKEN = "test-service-token-0123456789"
SERVICE = "meshserve.test.Guarded"
METRICS_SERVICE = "auth-test"


class Calls:
    """Counts the handler invocations: a refused call must never reach one."""

    def __init__(self) -> None:
        self.count = 0


def _add(calls: Calls, server) -> None:
    async def echo(request: bytes, context):
        calls.count += 1
        return request

    async def repeat(request: bytes, context):
        calls.count += 1
        for _ in range(3):
            yield request

    async def chat(requests, context):
        calls.count += 1
        async for request in requests:
            yield request

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Repeat": grpc.unary_stream_rpc_method_handler(repeat),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])


@pytest.fixture(scope="module")
async def guarded():
    calls = Calls()
    running = await grpc_server.create_server(
        GrpcServiceSettings(grpc_port=0, metrics_port=-1),
        METRICS_SERVICE,
        [grpc_server.Binding(_add, calls, SERVICE)],
        service_token=TOKEN,
    )
    yield running, calls
    await running.stop(0)


async def _all_kinds(channel: grpc.aio.Channel, metadata=None) -> list[bytes]:
    """One unary, one server-streaming and one bidirectional call; their replies."""
    echo = await channel.unary_unary(f"/{SERVICE}/Echo")(b"a", metadata=metadata)
    repeat = [m async for m in channel.unary_stream(f"/{SERVICE}/Repeat")(b"b", metadata=metadata)]
    chat_call = channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"c", b"d"]), metadata=metadata)
    chat = [m async for m in chat_call]
    return [echo, *repeat, *chat]


@pytest.mark.parametrize(
    "metadata",
    [None, ((service_auth.HEADER, "wrong"),), (("authorization", f"Bearer {TOKEN}"),), ((service_auth.HEADER, ""),)],
    ids=["none", "wrong", "other-header", "empty"],
)
@pytest.mark.parametrize("method", ["Echo", "Repeat", "Chat"])
async def test_calls_without_the_token_are_unauthenticated_and_run_nothing(guarded, metadata, method):
    running, calls = guarded
    before = calls.count
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if method == "Echo":
                await channel.unary_unary(f"/{SERVICE}/Echo")(b"x", metadata=metadata)
            elif method == "Repeat":
                [m async for m in channel.unary_stream(f"/{SERVICE}/Repeat")(b"x", metadata=metadata)]
            else:
                [m async for m in channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"x"]), metadata=metadata)]
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in (err.value.details() or "")
    assert MeshError.from_rpc_error(err.value).code is ErrorCode.UNAUTHENTICATED
    assert calls.count == before


async def test_refused_calls_create_no_metric_series_even_for_made_up_methods(guarded):
    running, _ = guarded
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        for i in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(f"/{SERVICE}/MadeUp{i}")(b"x")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f'"{METRICS_SERVICE}"'.encode() not in generate_latest(REGISTRY)


async def test_every_kind_of_call_works_with_the_token_from_our_client_interceptors(guarded):
    running, calls = guarded
    before = calls.count
    interceptors = service_auth.client_interceptors(TOKEN)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", interceptors=interceptors) as channel:
        assert await _all_kinds(channel) == [b"a", b"b", b"b", b"b", b"c", b"d"]
    assert calls.count == before + 3


async def test_the_token_as_plain_call_metadata_works(guarded):
    running, _ = guarded
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        assert await _all_kinds(channel, service_auth.metadata(TOKEN)) == [b"a", b"b", b"b", b"b", b"c", b"d"]


async def test_health_checks_need_no_token_but_reflection_does(guarded):
    running, _ = guarded
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [
                r
                async for r in stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            ]
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=service_auth.metadata(TOKEN)
        )
        names = [s.name for r in [r async for r in answers] for s in r.list_services_response.service]
        assert SERVICE in names


async def test_a_client_with_the_wrong_token_reports_our_fault_not_the_callers(guarded):
    running, _ = guarded
    client = UpstreamClient(UpstreamSettings(address=f"127.0.0.1:{running.port}", service_token="wrong"))
    try:
        with pytest.raises(MeshError) as err:
            await client._call(client.channel.unary_unary(f"/{SERVICE}/Echo"), b"x")
        assert err.value.code is ErrorCode.INTERNAL  # a 500 of ours, never a 401 to the API caller
        assert await client.serving()  # health stays open
    finally:
        await client.close()


async def test_upstream_settings_read_the_token_and_its_file(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    monkeypatch.setenv("MESHSERVE_SERVICE_TOKEN_FILE", str(path))
    assert service_auth.configured_token(UpstreamSettings(address="x:1")) == TOKEN
    assert service_auth.configured_token(GrpcServiceSettings()) == TOKEN
    monkeypatch.setenv("MESHSERVE_SERVICE_TOKEN", "from-env")
    assert service_auth.configured_token(UpstreamSettings(address="x:1")) == "from-env"
    assert "from-env" not in repr(GrpcServiceSettings())  # a SecretStr: never in logs or reprs
    path.write_text("\n")
    monkeypatch.delenv("MESHSERVE_SERVICE_TOKEN")
    with pytest.raises(ValueError):
        service_auth.configured_token(GrpcServiceSettings())


def test_only_probe_methods_are_open():
    assert service_auth.is_open("/grpc.health.v1.Health/Check")
    assert service_auth.is_open("/grpc.health.v1.Health/Watch")
    assert service_auth.is_open("/inference.GRPCInferenceService/ServerReady")
    for method in (
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        "/inference.GRPCInferenceService/ServerMetadata",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.health.v1.HealthX/Check",
    ):
        assert not service_auth.is_open(method), method


async def test_an_unreachable_upstream_is_reported_without_transport_details(caplog):
    port = free_port()  # nothing listens there
    client = PreprocessClient(UpstreamSettings(address=f"127.0.0.1:{port}", timeout_s=5, service_token=TOKEN))
    try:
        with pytest.raises(MeshError) as err:
            await client.preprocess(preprocess_pb2.PreprocessRequest(model_id="m"))
    finally:
        await client.close()
    assert err.value.code is ErrorCode.UPSTREAM_UNAVAILABLE
    assert err.value.message == "preprocess service is unavailable"  # no address, no channel error
    assert str(port) in caplog.text  # the details are in our log


def test_meshserve_up_gives_all_its_children_one_fresh_token_per_run(tmp_path, monkeypatch):
    from services.supervisor import SupervisorSettings, plan

    monkeypatch.delenv("MESHSERVE_SERVICE_TOKEN", raising=False)
    settings = SupervisorSettings(replicas={"inference": 2})  # with Envoy between the stages
    children, _ = plan(settings, {}, tmp_path)
    assert {c.name for c in children} >= {"gateway", "preprocess", "inference-0", "inference-1", "envoy"}
    tokens = {c.env["MESHSERVE_SERVICE_TOKEN"] for c in children}
    assert len(tokens) == 1 and len(next(iter(tokens))) >= 32
    again, _ = plan(settings, {}, tmp_path)
    assert {c.env["MESHSERVE_SERVICE_TOKEN"] for c in again} != tokens
    chosen, _ = plan(settings, {"MESHSERVE_SERVICE_TOKEN": "operator-chosen"}, tmp_path)
    assert {c.env["MESHSERVE_SERVICE_TOKEN"] for c in chosen} == {"operator-chosen"}

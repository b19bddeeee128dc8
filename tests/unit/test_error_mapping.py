"""Every catalog error through a real grpc.aio server with the production interceptor chain:
the gRPC status a caller sees, and the MeshError a meshserve client rebuilds from it."""

from __future__ import annotations

import grpc
import pytest

from services.common import grpc_server
from services.common.errors import ErrorCode, MeshError
from services.common.settings import GrpcServiceSettings

METHOD = "/meshserve.test.Errors/Raise"


def _add(servicer, server) -> None:
    async def raise_error(request: bytes, context):
        name = request.decode()
        if name == "crash":
            raise ZeroDivisionError("secret internals")
        raise MeshError(ErrorCode[name], f"failure {name}", param="inputs" if name == "INVALID_INPUT" else None)

    handler = grpc.unary_unary_rpc_method_handler(raise_error)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("meshserve.test.Errors", {"Raise": handler})])


@pytest.fixture(scope="module")
async def errors_server():
    running = await grpc_server.create_server(
        GrpcServiceSettings(grpc_port=0, metrics_port=-1),
        "test",
        [grpc_server.Binding(_add, None, "meshserve.test.Errors")],
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield channel.unary_unary(METHOD)
    await channel.close()
    await running.stop(0)


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.slug)
async def test_mesh_errors_keep_their_code_across_the_wire(errors_server, code):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await errors_server(code.name.encode())
    assert err.value.code() == code.grpc_code
    assert err.value.details() == f"failure {code.name}"
    rebuilt = MeshError.from_rpc_error(err.value, upstream="test")
    assert rebuilt.code is code
    assert rebuilt.message == f"failure {code.name}"
    if code.http_status in (429, 503):
        assert rebuilt.retry_after_s is not None


async def test_unexpected_exceptions_become_a_generic_internal_error(errors_server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await errors_server(b"crash")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error"
    assert "secret" not in str(err.value)


def test_bare_grpc_statuses_map_to_the_closest_code():
    class Bare(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "connection refused"

        def trailing_metadata(self):
            return ()

    assert MeshError.from_rpc_error(Bare(grpc.StatusCode.UNAVAILABLE), upstream="inference").code is (
        ErrorCode.UPSTREAM_UNAVAILABLE
    )
    internal = MeshError.from_rpc_error(Bare(grpc.StatusCode.UNKNOWN), upstream="inference")
    assert internal.code is ErrorCode.INTERNAL and "connection refused" not in internal.message


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.slug)
def test_every_code_has_one_status_per_transport(code):
    assert 400 <= code.http_status < 600
    assert code.hf_type and code.openai_type
    # Caller mistakes are never counted as server faults; 501 is the one 5xx that is the caller's choice.
    if code.http_status < 500 or code is ErrorCode.NOT_IMPLEMENTED:
        assert not code.server_fault
    else:
        assert code.server_fault

"""Admission before work that grows with the input (issue 14, finding 1): a key already at its
request limit is refused 429 before its prompt is rendered or tokenized, on REST and gRPC; an
over-long prompt is refused at the gateway without reaching preprocess.

The gateway is the real app (REST through its ASGI transport, gRPC on a real grpc.aio server, both
with authentication and the in-process limiter) in front of the shared mesh's stages; whether
preprocess was asked is read from its own /metrics (calls it handled, by method)."""

from __future__ import annotations

import re

import grpc
import httpx
import pytest
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from services.common import grpc_server
from services.common.settings import GrpcServiceSettings
from services.gateway.api.grpc_servicer import GatewayServicer
from services.gateway.api.http_app import create_app, wrap
from services.gateway.control.auth import GrpcAuthInterceptor
from services.gateway.control.plane import ControlPlane
from services.gateway.main import SERVICE_NAME, build_pipeline
from services.gateway.service import GatewayServices
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.xdist_group("mesh")

LM = "meshserve/tiny-llama-chat"
ADMIN = "msk_admin_admission-first-0123456789abcdefghijklmnopqrstuvwxyz"
LONG = "word " * 40_000  # 200,000 characters


def prepare_calls(mesh) -> float:
    """PrepareGeneration calls preprocess has handled (any status), from its /metrics."""
    text = httpx.get(f"http://127.0.0.1:{mesh.ports['pre_m']}/metrics", timeout=10).text
    pattern = re.compile(r"^meshserve_grpc_server_handled_total\{[^}]*PrepareGeneration[^}]*\} (\S+)$", re.M)
    return sum(float(value) for value in pattern.findall(text))


@pytest.fixture
async def gateway(mesh, tmp_path, monkeypatch):
    """(REST client, gRPC stub, key store) of a gateway with auth in front of the mesh's stages."""
    if hasattr(mesh, "service_token"):  # stages that require the service credential
        monkeypatch.setenv("MESHSERVE_SERVICE_TOKEN", mesh.service_token)
    settings = GatewaySettings(
        home=str(tmp_path), auth=True, ledger=False, coalesce=False, admin_token=ADMIN,
        database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
        preprocess_address=f"127.0.0.1:{mesh.ports['pre']}",
        inference_address=f"127.0.0.1:{mesh.ports['inference']}",
        postprocess_address=f"127.0.0.1:{mesh.ports['post']}",
    )  # fmt: skip
    control = ControlPlane.from_settings(settings)
    await control.start(settings)
    pipeline = build_pipeline(settings)
    services = GatewayServices.build(settings, pipeline, control=control)
    servicer = GatewayServicer(services)
    binding = grpc_server.Binding(gateway_pb2_grpc.add_GatewayServiceServicer_to_server, servicer, SERVICE_NAME)
    server = await grpc_server.create_server(
        GrpcServiceSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1),
        "gateway",
        [binding],
        inner_interceptors=[GrpcAuthInterceptor(control.auth)],
    )
    app = wrap(create_app(settings, services), settings, control.auth)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield client, gateway_pb2_grpc.GatewayServiceStub(channel), control.keys
    await server.stop(0)
    await pipeline.close()
    await control.close()


async def new_key(keys, **limits) -> str:
    _, token = keys.create("admission-first", ["inference"], **limits)
    await keys.reload()
    return token


def chat(content: str) -> dict:
    return {"model": LM, "messages": [{"role": "user", "content": content}], "max_tokens": 2}


async def test_a_key_at_its_request_limit_gets_429_before_its_prompt_is_tokenized(gateway, mesh):
    client, _, keys = gateway
    auth = {"authorization": f"Bearer {await new_key(keys, requests_per_minute=1)}"}
    first = await client.post("/v1/chat/completions", json=chat("Hello there."), headers=auth)
    assert first.status_code == 200, first.text
    before = prepare_calls(mesh)
    assert before >= 1  # the counter sees the first request's tokenization
    refused = await client.post("/v1/chat/completions", json=chat(LONG), headers=auth)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited" and "Retry-After" in refused.headers
    assert prepare_calls(mesh) == before  # preprocess was not asked to render or tokenize it


async def test_grpc_generate_at_the_request_limit_is_refused_before_tokenizing(gateway, mesh):
    _, stub, keys = gateway
    metadata = [("authorization", f"Bearer {await new_key(keys, requests_per_minute=1)}")]
    params = tasks_pb2.GenerationParameters(max_new_tokens=2)
    first = [r async for r in stub.Generate(gateway_pb2.GenerateRequest(model_id=LM, prompt="Hello", parameters=params), metadata=metadata)]  # fmt: skip
    assert first and first[-1].finish_reason
    before = prepare_calls(mesh)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(gateway_pb2.GenerateRequest(model_id=LM, prompt=LONG, parameters=params), metadata=metadata):  # fmt: skip
            pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert prepare_calls(mesh) == before


async def test_an_over_long_prompt_is_refused_at_the_gateway_naming_the_cap(gateway, mesh):
    client, stub, keys = gateway
    token = await new_key(keys)
    before = prepare_calls(mesh)
    reply = await client.post("/v1/chat/completions", json=chat(LONG), headers={"authorization": f"Bearer {token}"})
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages" and "200000 characters" in error["message"] and "100000" in error["message"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        request = gateway_pb2.GenerateRequest(model_id=LM, prompt=LONG)
        async for _ in stub.Generate(request, metadata=[("authorization", f"Bearer {token}")]):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "100000" in err.value.details()
    assert prepare_calls(mesh) == before

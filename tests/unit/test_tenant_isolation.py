"""What one API key can learn about another, and what it can spend, through the real gateway app
(auth middleware, routes, response cache, rate limiter, ledger on a SQLite file) over httpx's ASGI
transport. Only the pipeline's upstream hop is replaced: `predict` answers from the input without
the preprocess / inference / postprocess services, and counts its calls (the cache is what is
tested, not the model)."""

from __future__ import annotations

import grpc
import httpx
import pytest
import sqlalchemy as sa
from meshserve.tasks.v1 import tasks_pb2

from services.gateway import db
from services.gateway.api.http_app import create_app, wrap
from services.gateway.control.plane import ControlPlane
from services.gateway.ledger import migrate, usage
from services.gateway.main import build_pipeline
from services.gateway.pipeline.cache import ENTRY_OVERHEAD_BYTES, ResponseCache
from services.gateway.pipeline.runner import Prediction
from services.gateway.service import GatewayServices
from services.gateway.settings import GatewaySettings
from tests.unit.test_ledger import database_url, postgres_server  # noqa: F401  (SQLite and Postgres)

SENTIMENT = "/models/meshserve/sentiment-minilm"
ADMIN_TOKEN = "msk_admin_" + "tenant-isolation-test-0123456789abcdefghijklmnop"


class Gateway:
    def __init__(self, control: ControlPlane, pipeline, app, calls: list) -> None:
        self.control, self.pipeline, self.calls = control, pipeline, calls
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")

    async def key(self, name: str, **limits) -> dict[str, str]:
        _, token = self.control.keys.create(name, ["inference", "read"], **limits)
        await self.control.keys.reload()  # as POST /admin/keys does: this replica knows it at once
        return {"Authorization": f"Bearer {token}"}


async def _gateway(tmp_path, **overrides):
    settings = GatewaySettings(home=str(tmp_path), admin_token=ADMIN_TOKEN, **overrides)
    control = ControlPlane.from_settings(settings)
    await control.start(settings)
    pipeline = build_pipeline(settings)  # channels connect lazily: nothing is dialled
    calls: list[list[str]] = []

    async def predict(model_id, task, inputs, parameters=None, **_):
        texts = list(inputs.text.texts)
        calls.append(texts)
        items = [
            tasks_pb2.ClassificationList(labels=[tasks_pb2.Classification(label=f"len-{len(t)}", score=1.0)])
            for t in texts
        ]
        result = tasks_pb2.TaskResult(classifications=tasks_pb2.Classifications(items=items))
        return Prediction(model_id, task, result, tasks_pb2.Usage(input_tokens=len(texts)))

    pipeline.predict = predict  # the upstream hop only (this instance)
    app = wrap(create_app(settings, GatewayServices.build(settings, pipeline, control=control)), settings, control.auth)
    return Gateway(control, pipeline, app, calls)


@pytest.fixture
async def gateway(tmp_path):
    gw = await _gateway(tmp_path)
    yield gw
    await gw.client.aclose()
    await gw.control.close()
    await gw.pipeline.close()


async def test_another_key_misses_the_cache_on_the_same_input(gateway):
    alice, bob = await gateway.key("alice"), await gateway.key("bob")
    body = {"inputs": "what alice asked"}
    states = []
    for headers in (alice, alice, bob, bob):
        reply = await gateway.client.post(SENTIMENT, json=body, headers=headers)
        assert reply.status_code == 200, reply.text
        states.append(reply.headers["x-cache"])
    assert states == ["MISS", "HIT", "MISS", "HIT"]  # bob cannot tell that alice sent it
    assert len(gateway.calls) == 2


async def test_a_shared_cache_is_an_explicit_opt_in(tmp_path):
    gateway = await _gateway(tmp_path, cache_shared=True)
    try:
        body = {"inputs": "public text"}
        first = await gateway.client.post(SENTIMENT, json=body, headers=await gateway.key("alice"))
        second = await gateway.client.post(SENTIMENT, json=body, headers=await gateway.key("bob"))
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert second.json() == first.json()
    finally:
        await gateway.client.aclose()
        await gateway.control.close()
        await gateway.pipeline.close()


def test_the_cache_is_bounded_in_bytes_and_evicts_the_oldest():
    entry = 4000
    cache = ResponseCache(max_bytes=3 * (entry + ENTRY_OVERHEAD_BYTES), max_entry_bytes=10_000, ttl_s=600)
    for i in range(4):
        cache.put(bytes([i]) * 16, b"x" * entry)
    assert cache.get("m", bytes([0]) * 16) is None  # evicted to make room for the fourth
    assert all(cache.get("m", bytes([i]) * 16) is not None for i in (1, 2, 3))
    assert cache.size_bytes <= 3 * (entry + ENTRY_OVERHEAD_BYTES)


def test_a_response_over_the_entry_cap_is_not_cached():
    cache = ResponseCache(max_bytes=1 << 20, max_entry_bytes=1000, ttl_s=600)
    cache.put(b"small", b"x" * 100)
    cache.put(b"large", b"x" * 5000)
    assert cache.get("m", b"small") is not None and cache.get("m", b"large") is None
    # Many tiny responses count their bookkeeping too: the bound holds in entries of ~nothing.
    tiny = ResponseCache(max_bytes=100 * ENTRY_OVERHEAD_BYTES, max_entry_bytes=1000, ttl_s=600)
    for i in range(1000):
        tiny.put(i.to_bytes(16, "little"), b"1")
    assert tiny.size_bytes <= 100 * ENTRY_OVERHEAD_BYTES


async def test_read_routes_count_against_the_keys_requests_per_minute(gateway):
    limited = await gateway.key("reader", requests_per_minute=3)
    replies = [
        await gateway.client.get("/v1/models", headers=limited),
        await gateway.client.get("/v1/usage", headers=limited),
        await gateway.client.get("/models/meshserve/sentiment-minilm/info", headers=limited),
        await gateway.client.get("/v1/models", headers=limited),
    ]
    assert [r.status_code for r in replies] == [200, 200, 200, 429], [r.text for r in replies]
    assert replies[0].headers["ratelimit"].startswith('"requests";r=2;')
    refused = replies[-1]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limited"
    # ... and so does inference: the same window.
    spent = await gateway.client.post(SENTIMENT, json={"inputs": "x"}, headers=limited)
    assert spent.status_code == 429
    # Another key is not affected.
    assert (await gateway.client.get("/v1/models", headers=await gateway.key("other"))).status_code == 200


async def test_request_ids_are_the_gateways_and_the_clients_id_has_its_own_column(gateway):
    alice = {**await gateway.key("alice"), "X-Request-Id": "my-id"}
    replies = [await gateway.client.post(SENTIMENT, json={"inputs": f"text {i}"}, headers=alice) for i in range(2)]
    ids = [r.headers["x-request-id"] for r in replies]
    assert len(set(ids)) == 2 and "my-id" not in ids
    assert [r.headers["x-client-request-id"] for r in replies] == ["my-id", "my-id"]
    await gateway.control.ledger.flush()
    rows = await gateway.control.ledger.query(limit=10)
    assert sorted((r["request_id"], r["client_request_id"]) for r in rows) == sorted((i, "my-id") for i in ids)
    # Without a client id: a fresh id all the same, no client column.
    plain = await gateway.client.post(SENTIMENT, json={"inputs": "z"}, headers=await gateway.key("bob"))
    assert plain.headers["x-request-id"] not in ids and "x-client-request-id" not in plain.headers


def test_an_older_ledger_gains_the_client_request_id_column(database_url):  # noqa: F811
    engine = db.make_engine(database_url)
    old = sa.MetaData()
    sa.Table("usage", old, *(c.copy() for c in usage.columns if c.name != "client_request_id"))
    old.create_all(engine)
    migrate.upgrade(engine)  # `meshserve db upgrade`: revision 0001 adds the column
    migrate.upgrade(engine)  # idempotent
    columns = {c["name"] for c in sa.inspect(engine).get_columns("usage")}
    assert "client_request_id" in columns
    engine.dispose()


async def test_grpc_list_models_counts_against_the_keys_requests_per_minute(tmp_path):
    """The same on the typed gRPC API: ListModels is a read, and reads take from the window."""
    from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    from services.gateway.main import Gateway

    settings = GatewaySettings(
        home=str(tmp_path),
        admin_token=ADMIN_TOKEN,
        grpc_port=0,
        http_port=0,
        ledger=False,
        inference_address="127.0.0.1:1",  # nothing there: models read as not ready
        upstream_attempts=1,
    )
    gw = Gateway(settings)
    await gw.control.start(settings)
    port = await gw.start_grpc()
    try:
        _, token = gw.control.keys.create("reader", ["read"], requests_per_minute=2)
        await gw.control.keys.reload()
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for _ in range(2):
                await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests per minute" in refused.value.details()
    finally:
        await gw.grpc.stop(0)
        await gw.control.close()
        await gw.pipeline.close()

"""The gateway's control plane end to end: API keys and scopes on every route, rate limits and
budgets shared by two gateway replicas through a real Redis and one ledger database, the usage
ledger (exact rows, nothing lost on SIGTERM), and no token in logs or traces."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from huggingface_hub import InferenceClient
from openai import OpenAI

from services.gateway.control.auth import rest_scope
from tests.e2e.test_tracing import otel_env, receiver  # noqa: F401  (the in-test OTLP collector fixture)
from tests.helpers import MODEL_ID, REPO, GatewayProcess, sqlite_usd, start_mesh

pytestmark = pytest.mark.xdist_group("control")

PRICE = 0.001  # USD per sentiment request in this suite's catalog
TOKEN_PRICE = 0.001  # USD per generated token of the LM in this suite's catalog
LM = "meshserve/tiny-llama-chat"
ADMIN = "msk_admin_test-admin-token-0123456789abcdefghijklmnopqrstuvwxyz"
SENTIMENT = "meshserve/sentiment-minilm"


@pytest.fixture(scope="module")
def cp(tmp_path_factory, models_dir, redis_url, receiver):  # noqa: F811
    """A mesh with auth on, Redis for limits and budgets, one SQLite ledger, traces to a receiver;
    plus a second gateway replica sharing Redis and the database."""
    tmp = tmp_path_factory.mktemp("control")
    db = tmp / "gateway.db"
    # The sentiment model priced per request only, so that a request's reservation equals its real
    # cost and a budget admits an exact number of requests.
    catalog = yaml.safe_load((REPO / "catalog.yaml").read_text())
    for model in catalog["models"]:
        if model["id"] == SENTIMENT:
            model["pricing"] = {"per_request_usd": PRICE}
        if model["id"] == LM:
            model["pricing"] = {"output_per_1k_tokens_usd": TOKEN_PRICE * 1000}
    (tmp / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    env = {
        "MESHSERVE_CATALOG": str(tmp / "catalog.yaml"),
        "MESHSERVE_GATEWAY_AUTH": "true",
        "MESHSERVE_GATEWAY_LEDGER": "true",
        "MESHSERVE_ADMIN_TOKEN": ADMIN,
        "MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{db}",
        "MESHSERVE_GATEWAY_REDIS_URL": redis_url,
        "MESHSERVE_GATEWAY_COALESCE": "true",
        **otel_env(receiver[1]),
    }
    mesh = start_mesh(tmp, env)
    second = GatewayProcess(mesh, tmp / "gateway-b.log")
    yield mesh, second, db
    second.stop()
    mesh.stop()


def admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)


def create_key(url: str, **spec) -> dict:
    reply = admin(url).post("/admin/keys", json={"name": "test", **spec})
    assert reply.status_code == 201, reply.text
    return reply.json()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def concrete(path: str) -> str:
    """A request path for a route template."""
    path = path.replace("{model_path:path}", f"{MODEL_ID}")
    path = re.sub(r"\{[^}]+\}", "some-id", path)
    return path


def app_routes() -> list[tuple[str, str]]:
    """Every (method, path template) the gateway app registers, read from the app object itself,
    so a route added later is walked without editing this test."""
    from starlette.routing import Route

    from services.gateway.api.http_app import create_app
    from services.gateway.main import build_pipeline
    from services.gateway.service import GatewayServices
    from services.gateway.settings import GatewaySettings

    async def build():
        settings = GatewaySettings()
        pipeline = build_pipeline(settings)  # channels connect lazily: nothing is dialled
        app = create_app(settings, GatewayServices.build(settings, pipeline))
        await pipeline.close()
        return app

    app = asyncio.run(build())
    return [
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in sorted(route.methods - {"HEAD"})
    ]


ROUTES = app_routes()


def test_the_route_walk_covers_the_admin_and_inference_routes():
    paths = {p for _, p in ROUTES}
    assert {"/admin/keys", "/v1/usage", "/v1/embeddings", "/models/{model_path:path}"} <= paths


@pytest.mark.parametrize(("method", "template"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_needs_a_token_and_its_scope(cp, method, template):
    mesh, _, _ = cp
    path = concrete(template)
    scope = rest_scope(method, path, metrics_public=True)
    if scope is None:
        assert httpx.request(method, mesh.url + path, timeout=30).status_code != 401
        return
    body = b"{}" if method in ("POST", "PUT") else None
    anonymous = httpx.request(method, mesh.url + path, content=body, timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.request(method, mesh.url + path, content=body, headers=bearer("msk_nope_nope"), timeout=30)
    assert wrong.status_code == 401
    other = {"inference": ["read"], "read": ["inference"], "admin": ["inference", "read"]}[scope]
    key = _scoped_keys(mesh.url)[tuple(other)]
    lacking = httpx.request(method, mesh.url + path, content=body, headers=bearer(key), timeout=30)
    assert lacking.status_code == 403, (scope, lacking.text)


def test_api_docs_are_public_offline_and_offer_bearer_authorization(cp):
    """What a browser does with /docs: the page, its Swagger UI assets from the gateway itself (no
    CDN), the document without a key; the document's bearer scheme is what "Authorize" fills in,
    and an operation sent the way "Try it out" sends it (that header) answers."""
    mesh, _, _ = cp
    page = httpx.get(mesh.url + "/docs", timeout=30)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.text)
    assert len(assets) == 2 and all(a.startswith("/static-offline-docs/") for a in assets), assets
    for asset in assets:
        reply = httpx.get(mesh.url + asset, timeout=30)
        assert reply.status_code == 200 and len(reply.content) > 100_000, asset
    assert "cdn" not in page.text.lower()
    assert httpx.get(mesh.url + "/redoc", timeout=30).status_code == 200
    spec = httpx.get(mesh.url + "/openapi.json", timeout=30).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        **spec["components"]["securitySchemes"]["bearerAuth"],
        "type": "http",
        "scheme": "bearer",
    }
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/readyz"]["get"]["security"] == []
    assert "security" not in spec["paths"]["/v1/embeddings"]["post"]  # the document's default: the bearer
    key = create_key(mesh.url, scopes=["inference"])["token"]
    reply = httpx.post(
        mesh.url + "/v1/embeddings", json={"model": MODEL_ID, "input": "docs"}, headers=bearer(key), timeout=30
    )
    assert reply.status_code == 200


_KEYS: dict = {}


def _scoped_keys(url: str) -> dict:
    if not _KEYS:
        for scopes in (("read",), ("inference",), ("inference", "read")):
            _KEYS[scopes] = create_key(url, scopes=list(scopes))["token"]
    return _KEYS


def test_real_clients_with_a_key_and_usage_headers(cp):
    mesh, _, _ = cp
    token = create_key(mesh.url, scopes=["inference", "read"])["token"]
    client = OpenAI(base_url=mesh.url + "/v1", api_key=token)
    assert len(client.embeddings.create(model=MODEL_ID, input=["a", "b"]).data) == 2
    hf = InferenceClient(model=f"{mesh.url}/models/{SENTIMENT}", token=token)
    assert hf.text_classification("lovely")[0].label == "POSITIVE"
    reply = httpx.post(f"{mesh.url}/models/{SENTIMENT}", json={"inputs": "fine"}, headers=bearer(token))
    assert int(reply.headers["x-usage-input-tokens"]) > 0 and float(reply.headers["x-usage-cost-usd"]) > 0
    with pytest.raises(Exception) as err:
        OpenAI(base_url=mesh.url + "/v1", api_key="msk_wrong_token", max_retries=0).models.list()
    assert "401" in str(err.value)


def test_model_and_task_restrictions(cp):
    mesh, _, _ = cp
    token = create_key(mesh.url, models=[SENTIMENT], tasks=["text-classification"])["token"]
    ok = httpx.post(f"{mesh.url}/models/{SENTIMENT}", json={"inputs": "fine"}, headers=bearer(token))
    assert ok.status_code == 200
    other = httpx.post(f"{mesh.url}/models/{MODEL_ID}", json={"inputs": "fine"}, headers=bearer(token))
    assert other.status_code == 403 and "model" in other.json()["error"]
    # Generation checks the key before it tokenizes the prompt: a prompt too long for the model
    # would be a 400 from preprocessing, but this key may not use the model at all.
    chat = httpx.post(f"{mesh.url}/v1/chat/completions", headers=bearer(token), timeout=30,
                      json={"model": LM, "messages": [{"role": "user", "content": "word " * 50_000}]})  # fmt: skip
    assert chat.status_code == 403 and chat.json()["error"]["param"] == "model", chat.text


def test_revoked_key_stops_on_both_replicas(cp):
    mesh, second, _ = cp
    key = create_key(mesh.url)
    for url in (mesh.url, second.url):  # a key made on one replica works on the other at once
        assert (
            httpx.post(f"{url}/models/{SENTIMENT}", json={"inputs": "x"}, headers=bearer(key["token"])).status_code
            == 200
        )
    assert admin(mesh.url).delete(f"/admin/keys/{key['id']}").status_code == 200
    assert (
        httpx.post(f"{mesh.url}/models/{SENTIMENT}", json={"inputs": "x"}, headers=bearer(key["token"])).status_code
        == 401
    )
    deadline = time.monotonic() + 60  # the other replica's next key poll; generous for a loaded machine
    status = 200
    while time.monotonic() < deadline and status != 401:
        status = httpx.post(
            f"{second.url}/models/{SENTIMENT}", json={"inputs": "x"}, headers=bearer(key["token"])
        ).status_code
        time.sleep(0.05)
    assert status == 401


async def _burst(urls: list[str], token: str, n: int, path: str, body_of) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(
            *(client.post(urls[i % len(urls)] + path, json=body_of(i), headers=bearer(token)) for i in range(n))
        )


def test_rate_limit_is_shared_by_two_replicas(cp):
    mesh, second, _ = cp
    limit = 12
    token = create_key(mesh.url, requests_per_minute=limit)["token"]
    replies = asyncio.run(
        _burst([mesh.url, second.url], token, 40, f"/models/{SENTIMENT}", lambda i: {"inputs": f"burst {i}"})
    )
    ok = [r for r in replies if r.status_code == 200]
    limited = [r for r in replies if r.status_code == 429]
    assert len(ok) + len(limited) == 40
    assert limit - 1 <= len(ok) <= limit, len(ok)  # one window boundary may fall inside the burst
    assert all(1 <= int(r.headers["retry-after"]) <= 120 for r in limited)
    assert all("ratelimit" in r.headers and "ratelimit-policy" in r.headers for r in limited)


def test_concurrent_requests_never_overspend_the_budget(cp):
    mesh, second, db = cp
    budget, n = 20 * PRICE, 60
    key = create_key(mesh.url, budget_usd=budget, budget_period="day")
    replies = asyncio.run(
        _burst([mesh.url, second.url], key["token"], n, f"/models/{SENTIMENT}", lambda i: {"inputs": f"spend {i}"})
    )
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(ok) + len(refused) == n
    assert len(ok) == 20  # reservations are atomic across both replicas: exactly the budget
    assert all(r.json()["error_type"] == "overloaded" and "budget" in r.json()["error"] for r in refused)
    assert sum(float(r.headers["x-usage-cost-usd"]) for r in ok) == pytest.approx(budget)
    for url in (mesh.url, second.url):
        admin(url).get("/v1/usage", params={"limit": 0})  # flush both replicas' ledgers
    with sqlite3.connect(db) as conn:
        spent = sqlite_usd(conn.execute("SELECT SUM(cost_usd) FROM usage WHERE key_id = ?", (key["id"],)).fetchone()[0])
    assert spent == pytest.approx(budget) and spent <= budget + 1e-12


def test_ledger_rows_equal_acknowledged_requests(cp):
    mesh, second, db = cp
    key = create_key(mesh.url)
    replies = asyncio.run(
        _burst([mesh.url, second.url], key["token"], 50, f"/models/{SENTIMENT}", lambda i: {"inputs": f"row {i}"})
    )
    assert all(r.status_code == 200 for r in replies)
    ids = {r.headers["x-request-id"] for r in replies}
    for url in (mesh.url, second.url):  # each replica flushes its own queue when asked
        admin(url).get("/v1/usage", params={"key_id": key["id"], "limit": 0})
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT request_id, status FROM usage WHERE key_id = ?", (key["id"],)).fetchall()
    assert len(rows) == 50 and {r[0] for r in rows} == ids and {r[1] for r in rows} == {200}
    own = httpx.get(f"{mesh.url}/v1/usage", headers=bearer(key["token"])).json()
    assert sum(g["requests"] for g in own["totals"]["groups"]) == 50
    assert (
        httpx.get(f"{mesh.url}/v1/usage", params={"key_id": "admin"}, headers=bearer(key["token"])).status_code == 403
    )


def test_sigterm_mid_burst_loses_no_acknowledged_row(cp, tmp_path):
    mesh, _, db = cp
    key = create_key(mesh.url)
    third = GatewayProcess(mesh, tmp_path / "gateway-c.log")
    acknowledged: list[str] = []

    async def run() -> None:
        # SIGTERM goes after the 10th acknowledged response (a count, not a time: on a loaded
        # machine no request may have finished after any fixed delay), with the rest in flight.
        midway = asyncio.Event()
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i: int) -> None:
                with contextlib.suppress(httpx.HTTPError):
                    reply = await client.post(
                        f"{third.url}/models/{SENTIMENT}", json={"inputs": f"sigterm {i}"}, headers=bearer(key["token"])
                    )
                    if reply.status_code == 200:
                        acknowledged.append(reply.headers["x-request-id"])
                        if len(acknowledged) == 10:
                            midway.set()

            tasks = [asyncio.create_task(one(i)) for i in range(120)]
            await midway.wait()
            third.process.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks)

    asyncio.run(run())
    assert third.process.wait(30) == 0
    assert acknowledged, "no request finished before SIGTERM"
    with sqlite3.connect(db) as conn:
        rows = {r[0] for r in conn.execute("SELECT request_id FROM usage WHERE key_id = ?", (key["id"],))}
    assert set(acknowledged) <= rows


def test_no_token_in_logs_or_traces(cp, receiver):  # noqa: F811
    mesh, second, _ = cp
    collector = receiver[0]
    with collector.lock:
        before = len(collector.spans)
    token = create_key(mesh.url)["token"]
    httpx.post(f"{mesh.url}/models/{SENTIMENT}", json={"inputs": "x"}, headers=bearer(token))
    httpx.post(f"{mesh.url}/models/{SENTIMENT}", json={"inputs": "x"}, headers=bearer(token + "tampered"))
    secrets = [ADMIN, token, *_KEYS.values()]
    logs = mesh.log() + second.log_path.read_text(errors="replace")
    parts = [s.split("_", 2)[-1] for s in secrets]  # the secret after msk_<id>_ (it may contain "_" itself)
    assert all(len(p) >= 16 for p in parts)
    for secret, part in zip(secrets, parts, strict=True):
        assert secret not in logs and part not in logs
    deadline = time.monotonic() + 60  # spans leave in batches: wait until these requests' have come
    while True:
        with collector.lock:
            arrived = len(collector.spans) - before
            dumped = b"".join(span.SerializeToString() for _, span in collector.spans)
        if arrived >= 3 or time.monotonic() > deadline:  # the key's creation and the two requests
            break
        time.sleep(0.2)
    assert dumped, "no spans were exported"
    for secret, part in zip(secrets, parts, strict=True):
        assert secret.encode() not in dumped and part.encode() not in dumped


def test_keys_cli_create_list_revoke(cp, tmp_path):
    _, _, db = cp
    env = {**os.environ, "MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{db}"}
    run = [sys.executable, "-m", "services.cli", "keys"]
    created = subprocess.run(
        [*run, "create", "--name", "cli", "--scopes", "read"], env=env, capture_output=True, text=True
    )
    assert created.returncode == 0, created.stderr
    token = re.search(r"msk_\S+", created.stdout).group(0)
    listed = subprocess.run([*run, "list"], env=env, capture_output=True, text=True)
    assert "cli" in listed.stdout and token not in listed.stdout
    key_id = token.split("_")[1]
    revoked = subprocess.run([*run, "revoke", key_id], env=env, capture_output=True, text=True)
    assert revoked.returncode == 0, revoked.stderr


def test_grpc_api_needs_a_token_and_reports_usage(cp):
    import grpc
    from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    from tests.helpers import texts

    mesh, _, _ = cp
    request = gateway_pb2.PredictRequest(model_id=SENTIMENT, inputs=texts("a fine day"))
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reader = create_key(mesh.url, scopes=["read"])["token"]
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request, metadata=[("authorization", f"Bearer {reader}")])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=[("authorization", f"Bearer {reader}")]).models
        token = create_key(mesh.url)["token"]
        reply, call = stub.Predict.with_call(request, metadata=[("authorization", f"Bearer {token}")])
        assert reply.result.classifications.items[0].labels[0].label == "POSITIVE"
        trailers = dict(call.trailing_metadata())
        assert float(trailers["x-usage-cost-usd"]) == pytest.approx(PRICE)


def test_concurrent_streams_never_overspend_and_a_closed_stream_pays_what_it_used(cp):
    mesh, second, db = cp
    budget, max_tokens = 0.05, 20  # each stream reserves 20 tokens = $0.02: two fit at a time
    key = create_key(mesh.url, budget_usd=budget, budget_period="day")
    # min_tokens: every stream really costs what it reserved, so at most two are ever paid for (a
    # stream that ended early would free budget for more, and all 8 could pass one after another).
    body = {"model": LM, "messages": [{"role": "user", "content": "Tell me about json."}], "max_tokens": max_tokens,
            "min_tokens": max_tokens, "temperature": 1.0, "stream": True}  # fmt: skip

    async def stream(client: httpx.AsyncClient, url: str) -> tuple[int, str]:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=bearer(key["token"])) as r:
            return r.status_code, "".join([line async for line in r.aiter_lines()])

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(stream(client, (mesh.url, second.url)[i % 2]) for i in range(8)))

    results = asyncio.run(burst())
    ok = [text for status, text in results if status == 200]
    assert ok and len(ok) < 8, [status for status, _ in results]
    assert all(text.endswith("data: [DONE]") for text in ok)
    assert {status for status, _ in results} <= {200, 429}
    # A stream the client closes after a few tokens is charged for those tokens only. It must not
    # end by itself first: min_tokens rules out the end token, and 400 tokens (near the context) are
    # far more than the gateway writes before it sees the client gone, however loaded the machine.
    long = 400
    with httpx.stream("POST", mesh.url + "/v1/chat/completions",
                      json={**body, "max_tokens": long, "min_tokens": long, "temperature": 2.0},
                      headers=bearer(create_key(mesh.url)["token"]), timeout=30) as response:  # fmt: skip
        closed_id = response.headers["x-request-id"]
        for i, _ in enumerate(response.iter_lines()):
            if i >= 4:
                break
    deadline = time.monotonic() + 120  # the gateway notices the closed stream, then records it
    closed = None
    while closed is None and time.monotonic() < deadline:
        time.sleep(0.2)
        for url in (mesh.url, second.url):
            admin(url).get("/v1/usage", params={"limit": 0})  # flushes the ledger
        with sqlite3.connect(db) as conn:
            spent = sqlite_usd(
                conn.execute("SELECT SUM(cost_usd) FROM usage WHERE key_id = ?", (key["id"],)).fetchone()[0]
            )
            closed = conn.execute(
                "SELECT status, output_tokens, cost_usd FROM usage WHERE request_id = ?", (closed_id,)
            ).fetchone()
    assert closed is not None, "the closed stream never got its ledger row"
    assert spent <= budget + 1e-12
    status, tokens, cost = closed
    assert status == 499 and 0 < tokens < long and sqlite_usd(cost) == pytest.approx(tokens * TOKEN_PRICE)

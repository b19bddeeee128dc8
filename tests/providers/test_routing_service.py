"""The service layer of providers: metering at the dearest candidate's price and settling at the
answering one's, the ledger's provider fields (and old ledgers migrated), keys limited to
providers, and RoutingService over a real Providers with fake remote upstreams."""

from __future__ import annotations

import uuid
from contextlib import aclosing
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
import yaml

from services.common.catalog import Catalog, PricingSpec
from services.common.errors import ErrorCode, MeshError
from services.common.money import usd
from services.gateway.control.auth import Principal
from services.gateway.control.keys import ApiKey, KeyStore
from services.gateway.control.local_store import LocalControlStore
from services.gateway.control.metering import Metering
from services.gateway.db import make_engine
from services.gateway.ledger import migrate
from services.gateway.ledger.schema import FIELDS, usage
from services.gateway.ledger.writer import insert_rows
from services.gateway.pipeline.generation import GenerationRequest
from services.gateway.providers import Providers
from services.gateway.providers.config import load_providers
from services.gateway.service.context import CallContext
from services.gateway.service.routing import (
    REMOTE_TEMPLATE_TOKENS,
    LocalTask,
    RoutingService,
    prompt_size,
    remote_bounds,
)
from tests.helpers import REPO
from tests.unit.test_ledger import postgres_server  # noqa: F401 (a fixture)

CHEAP = PricingSpec(input_per_1k_tokens_usd=0.001, output_per_1k_tokens_usd=0.002)
DEAR = PricingSpec(input_per_1k_tokens_usd=0.01, output_per_1k_tokens_usd=0.03, per_request_usd=0.001)


class RemoteOnly:
    """A model only remote providers serve (what metering needs of it: an id and a price)."""

    def __init__(self, model_id: str = "acme/remote-chat", pricing: PricingSpec | None = None) -> None:
        self.id = model_id
        self.pricing = pricing or PricingSpec()


def _principal(**fields) -> Principal:
    return Principal(ApiKey(id=uuid.uuid4().hex[:12], name="t", scopes=("inference",), **fields))


class ListLedger:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def append(self, row: tuple) -> None:
        self.rows.append(row)

    def record(self, name: str, index: int = -1):
        return self.rows[index][FIELDS.index(name)]


# -- metering -----------------------------------------------------------------------------------
async def test_admission_holds_the_given_price_and_settles_at_the_answering_one():
    store, ledger = LocalControlStore(), ListLedger()
    metering = Metering(store, ledger, timeout_s=1.0)
    principal = _principal(budget_usd=10.0)
    try:
        metered = await metering.admit(
            principal, RemoteOnly(), "text-generation", "/v1/chat/completions", "r1",
            max_input_tokens=1000, max_output_tokens=1000, pricing=DEAR,
        )  # fmt: skip
        spent, held = await store.spent(principal.key_id, "month")
        assert spent == 0 and held == usd(DEAR.cost(1000, 1000, 1.0))
        metered.pricing, metered.provider, metered.attempts = CHEAP, "mesh-b", 2
        metered.upstream_request_id = "fake-b-7"
        async with metering.track(metered):
            metered.add(input_tokens=10, output_tokens=20, items=1)
        spent, held = await store.spent(principal.key_id, "month")
        assert held == 0 and spent == usd(CHEAP.cost(10, 20, 0.0))
    finally:
        await store.close()
    assert ledger.record("provider") == "mesh-b" and ledger.record("attempts") == 2
    assert ledger.record("upstream_request_id") == "fake-b-7"
    assert ledger.record("cost_usd") == usd(CHEAP.cost(10, 20, 0.0))


async def test_a_failed_request_costs_nothing_unless_its_stream_delivered_tokens():
    ledger = ListLedger()
    metering = Metering(None, ledger, timeout_s=1.0)
    for request_id, delivered in (("quiet", False), ("delivered", True)):
        metered = await metering.admit(
            _principal(), RemoteOnly(pricing=CHEAP), "text-generation", "/v1/completions", request_id,
            max_input_tokens=5,
        )  # fmt: skip
        metered.add(input_tokens=5, output_tokens=3)
        metered.delivered = delivered
        await metering.finish(metered, 502)
    assert ledger.record("cost_usd", 0) == 0.0
    assert ledger.record("cost_usd", 1) == usd(CHEAP.cost(5, 3, 0.0)) and ledger.record("status", 1) == 502


async def test_a_local_request_keeps_the_entry_price_and_local_row_defaults():
    ledger = ListLedger()
    metering = Metering(None, ledger, timeout_s=1.0)
    entry = RemoteOnly("meshserve/x", pricing=CHEAP)
    metered = await metering.admit(_principal(), entry, "feature-extraction", "/v1/embeddings", "l", max_input_tokens=5)
    assert metered.pricing is CHEAP and metered.provider == "local" and not metered.delivered
    await metering.finish(metered, 200)
    assert len(ledger.rows[0]) == len(FIELDS)
    assert (ledger.record("provider"), ledger.record("attempts"), ledger.record("upstream_request_id")) == (
        "local", 1, None,
    )  # fmt: skip


async def test_a_budget_refusal_at_the_dearest_price_gets_a_row_without_cost():
    store, ledger = LocalControlStore(), ListLedger()
    metering = Metering(store, ledger, timeout_s=1.0)
    try:
        with pytest.raises(MeshError) as refused:
            await metering.admit(
                _principal(budget_usd=0.01), RemoteOnly(pricing=CHEAP), "text-generation", "/v1/completions", "r",
                max_input_tokens=1000, max_output_tokens=1000, pricing=DEAR,
            )  # fmt: skip
    finally:
        await store.close()
    assert refused.value.code is ErrorCode.QUOTA_EXCEEDED
    assert ledger.record("cost_usd") == 0.0 and ledger.record("status") == refused.value.code.http_status


# -- the ledger ---------------------------------------------------------------------------------
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_an_older_ledger_gains_attempts_and_upstream_request_id_and_takes_old_rows(tmp_path, request, database):
    if database == "postgres":  # a database of this test's own on the throwaway server
        url, name = request.getfixturevalue("postgres_server"), f"migrate_{uuid.uuid4().hex[:12]}"
        with make_engine(url).execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        engine = make_engine(f"{url.rsplit('/', 1)[0]}/{name}")
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    old = sa.MetaData()
    old_type = {"cost_usd": sa.Float()}  # as it was then
    old_usage = sa.Table(
        "usage", old, *(sa.Column(c.name, old_type.get(c.name, c.type), primary_key=c.primary_key, nullable=c.nullable)
                        for c in usage.columns if c.name not in ("attempts", "upstream_request_id")),
    )  # fmt: skip
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(old_usage.insert().values(
            request_id="before", model="m", task="t", provider="local", route="", input_tokens=1, output_tokens=0,
            items=1, compute_s=0.0, cost_usd=0.0, status=200, latency_s=0.1, time=sa.func.current_timestamp(),
        ))  # fmt: skip
    migrate.upgrade(engine)  # `meshserve db upgrade`: 0001 adds the columns, 0002 makes cost exact
    migrate.upgrade(engine)  # idempotent
    old_row = ("old-shape", None, "m", "t", "local", 1, 2, 1, 0.5, 0.0, 200, 0.01, None, 1.7e9, "/r", None)
    new_row = (*old_row[:4], "mesh-b", *old_row[5:], 3, "up-1")
    new_row = ("new-shape", *new_row[1:])
    done, written, rejected, error = insert_rows(engine, [old_row, new_row])
    assert (done, written, rejected, error) == (2, 2, [], None)
    with engine.connect() as conn:
        rows = {r.request_id: r for r in conn.execute(sa.select(usage))}
    assert (rows["before"].attempts, rows["before"].upstream_request_id) == (1, None)
    assert (rows["old-shape"].attempts, rows["old-shape"].provider) == (1, "local")
    assert (rows["new-shape"].attempts, rows["new-shape"].upstream_request_id, rows["new-shape"].provider) == (
        3, "up-1", "mesh-b",
    )  # fmt: skip


# -- keys ---------------------------------------------------------------------------------------
def test_a_key_limited_to_providers_stores_lists_and_enforces_them(tmp_path):
    store = KeyStore(make_engine(f"sqlite:///{tmp_path / 'keys.db'}"))
    store.init_schema()
    key, _ = store.create("p", ["inference"], providers=["mesh-b", "local", "mesh-b"])
    assert key.providers == ("mesh-b", "local") and key.public()["providers"] == ["mesh-b", "local"]
    (stored,) = [k for k in store.all() if k.id == key.id]
    principal = Principal(stored)
    assert principal.allowed_providers == frozenset({"mesh-b", "local"})
    principal.allow_provider("local")
    with pytest.raises(MeshError) as denied:
        principal.allow_provider("mesh-c")
    assert denied.value.code is ErrorCode.PERMISSION_DENIED and "local, mesh-b" in denied.value.message
    everyone, _ = store.create("all", ["inference"])
    assert Principal(everyone).allowed_providers is None


@pytest.mark.parametrize("bad", ["Mesh-B", "", "-x", "a" * 65, "a b"])
def test_a_key_naming_an_impossible_provider_is_refused(tmp_path, bad):
    store = KeyStore(make_engine(f"sqlite:///{tmp_path / 'keys.db'}"))
    store.init_schema()
    with pytest.raises(MeshError) as refused:
        store.create("p", ["inference"], providers=[bad])
    assert refused.value.code is ErrorCode.INVALID_INPUT and refused.value.param == "providers"


def test_keys_of_an_older_release_gain_providers_and_allow_every_one(tmp_path):
    from tests.unit.test_key_migrations import previous_release_database

    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    previous_release_database(engine, with_salt=False)  # its api_keys has no providers column
    store = KeyStore(engine)
    store.init_schema()  # migration 0003 adds it
    stored = store.all()
    assert len(stored) == 3 and all(k.providers == () and Principal(k).allowed_providers is None for k in stored)


# -- RoutingService over a real Providers and fake upstreams ----------------------------------------
MODEL = "acme/remote-chat"  # served by remote providers only: no mesh needed
EMBEDDER = "acme/remote-embed"
RANKER = "acme/remote-ranker"
CLASSIFIER = "acme/remote-sentiment"
PRICES = {
    "dear": {"input_per_1k_tokens_usd": 0.01, "output_per_1k_tokens_usd": 0.03, "per_request_usd": 0.001},
    "cheap": {"input_per_1k_tokens_usd": 0.001, "output_per_1k_tokens_usd": 0.002},
}


@pytest.fixture(scope="module")
def upstreams(fakes):
    return {name: fakes["start"](name) for name in ("dear", "cheap")}


def _providers_file(tmp_path, upstreams) -> Path:
    """Both fakes as OpenAI providers of the chat and embedding models; the cheap one also as a TEI
    provider of a ranker and an HF provider of a classifier (a fake speaks every dialect)."""
    providers = [
        {
            "name": name,
            "kind": "openai",
            "base_url": fake.url + "/v1",
            "pricing": PRICES[name],
            "context_length": 8192,
            "timeouts": {"connect_s": 2, "first_byte_s": 10, "total_s": 30},
            "models": {
                MODEL: {"upstream": "fake-chat", "tasks": ["text-generation"]},
                EMBEDDER: {"upstream": "fake-embed", "tasks": ["feature-extraction"]},
            },
        }
        for name, fake in upstreams.items()
    ]
    cheap = upstreams["cheap"].url
    providers += [
        {"name": "tei-x", "kind": "tei", "base_url": cheap, "models": {RANKER: {"tasks": ["text-ranking"]}}},
        {"name": "hf-x", "kind": "hf", "base_url": cheap, "pricing": {"per_request_usd": 0.5},
         "models": {CLASSIFIER: {"upstream": "fake-sentiment", "tasks": ["text-classification"]}}},
    ]  # fmt: skip
    routing = {"policy": "preferred", "max_attempts": 3, "budget_s": 20, "backoff_base_s": 0.001,
               "backoff_max_s": 0.01, "breaker": {"failures": 50, "open_s": 0.5}}  # fmt: skip
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"routing": routing, "providers": providers}))
    return path


@pytest.fixture
async def routing(tmp_path, upstreams):
    """(RoutingService, its control store, the ledger rows) over the two fakes, both healthy."""
    for fake in upstreams.values():
        fake.reset()
    catalog = Catalog.load(REPO / "catalog.yaml")
    providers = Providers.from_config(load_providers(_providers_file(tmp_path, upstreams)), catalog)
    store, ledger = LocalControlStore(), ListLedger()
    metering = Metering(store, ledger, timeout_s=5.0)
    service = RoutingService(providers, catalog, metering, None, None, None, timeout_s=30.0)
    yield service, store, ledger
    await providers.close()
    await store.close()


def _ctx(principal: Principal, request_id: str = "req-1") -> CallContext:
    return CallContext(principal, request_id, "/v1/chat/completions")


async def _drain(generation) -> tuple[str, MeshError | None]:
    """Read a generation as respond() does (settled however it ends)."""
    text, failure = "", None
    try:
        async with generation.settled(), aclosing(generation.steps()) as steps:
            async for step in steps:
                text += step.text
    except MeshError as err:
        failure = err
    return text, failure


DEAR_SPEC = PricingSpec(**PRICES["dear"])
CHEAP_SPEC = PricingSpec(**PRICES["cheap"])


async def test_a_generation_fails_over_holds_the_dearest_price_and_settles_at_the_answering_one(routing, upstreams):
    service, store, ledger = routing
    principal = _principal(budget_usd=100.0)
    upstreams["dear"].control(mode="status", status=503)
    route = service.route(MODEL, "chat", principal=principal)
    assert not route.local_only and [c.provider for c in route.selection.candidates] == ["dear", "cheap"]
    request = GenerationRequest(messages=[("user", "one two three")], max_new_tokens=5)
    generation = await service.start(_ctx(principal), route, request, op="chat", stream=False)
    _, held = await store.spent(principal.key_id, "month")
    max_input, max_output = remote_bounds(request, 8192)
    assert held == usd(DEAR_SPEC.cost(max_input, max_output, 5.0))  # the dearest, though cheap answered
    done = await generation.collect()
    assert done.text == "tok0 tok1 tok2 tok3 tok4"
    assert done.last.completion_tokens == 5 and done.last.prompt_tokens == 3  # the upstream's usage
    spent, held = await store.spent(principal.key_id, "month")
    assert held == 0 and spent == usd(CHEAP_SPEC.cost(3, 5, 0.0))
    assert ledger.record("provider") == "cheap" and ledger.record("attempts") == 2
    assert ledger.record("upstream_request_id").startswith("fake-cheap-")
    assert (ledger.record("input_tokens"), ledger.record("output_tokens"), ledger.record("status")) == (3, 5, 200)
    # A non-streamed answer was read whole inside the attempt: no tokens per second to measure.
    assert service.providers.stats.sample("cheap", MODEL).tokens_per_s is None


async def test_the_budget_refuses_what_the_dearest_candidate_could_cost(routing):
    service, _, ledger = routing
    request = GenerationRequest(prompt="hello there", max_new_tokens=100)
    max_input, max_output = remote_bounds(request, 8192)
    between = (CHEAP_SPEC.cost(max_input, max_output, 5.0) + DEAR_SPEC.cost(max_input, max_output, 5.0)) / 2
    principal = _principal(budget_usd=between)
    route = service.route(MODEL, "completion", principal=principal)
    with pytest.raises(MeshError) as refused:
        await service.start(_ctx(principal), route, request, op="completion", stream=True)
    assert refused.value.code is ErrorCode.QUOTA_EXCEEDED and ledger.record("cost_usd") == 0.0
    cheap_only = service.route(f"{MODEL}:cheap", "completion", principal=principal)
    generation = await service.start(_ctx(principal, "req-2"), cheap_only, request, op="completion", stream=True)
    text, failure = await _drain(generation)
    assert failure is None and text and ledger.record("provider") == "cheap" and ledger.record("attempts") == 1


async def test_a_stream_that_dies_mid_way_pays_for_the_tokens_it_delivered(routing, upstreams):
    service, store, ledger = routing
    principal = _principal(budget_usd=100.0)
    upstreams["cheap"].control(mode="die_mid_stream", after_chunks=4)
    route = service.route(f"{MODEL}:cheap", "chat", principal=principal)
    request = GenerationRequest(messages=[("user", "hi")], max_new_tokens=10)
    generation = await service.start(_ctx(principal), route, request, op="chat", stream=True)
    text, failure = await _drain(generation)
    assert failure is not None and failure.code.server_fault and text
    delivered = ledger.record("output_tokens")
    assert 1 <= delivered < 10 and ledger.record("status") == failure.code.http_status
    # The upstream died before its usage: the prompt is estimated (a token per 4 UTF-8 bytes of
    # the prompt's bound), the completion is what was delivered.
    prompt = ledger.record("input_tokens")
    assert prompt == -(-prompt_size(request) // 4) > 0
    assert ledger.record("cost_usd") > 0 and ledger.record("cost_usd") == usd(CHEAP_SPEC.cost(prompt, delivered, 0.0))
    spent, held = await store.spent(principal.key_id, "month")
    assert held == 0 and spent == ledger.record("cost_usd")


async def test_a_request_every_provider_fails_costs_nothing_and_names_the_last_tried(routing, upstreams):
    service, _, ledger = routing
    for fake in upstreams.values():
        fake.control(mode="status", status=503)
    principal = _principal()
    route = service.route(MODEL, "chat", principal=principal)
    with pytest.raises(MeshError) as failed:
        await service.start(_ctx(principal), route, GenerationRequest(prompt="x", max_new_tokens=2), op="chat")
    assert failed.value.code is ErrorCode.UPSTREAM_UNAVAILABLE and "3 attempts" in failed.value.message
    assert ledger.record("cost_usd") == 0.0 and ledger.record("attempts") == 3 and ledger.record("status") == 503


async def test_remote_embeddings_are_metered_with_the_upstream_usage(routing):
    service, _, ledger = routing
    principal = _principal()
    route = service.route(f"{EMBEDDER}:cheap", "embed", principal=principal)
    result, headers = await service.embeddings(_ctx(principal), route, ["a b", "c d e"], dimensions=4)
    assert result.vectors.shape == (2, 4) and result.input_tokens == 5
    assert headers["X-Usage-Input-Tokens"] == "5" and ledger.record("provider") == "cheap"
    assert ledger.record("items") == 2 and ledger.record("upstream_request_id").startswith("fake-cheap-")


async def test_a_key_limited_to_providers_is_routed_only_to_them(routing):
    service, _, _ = routing
    route = service.route(MODEL, "chat", principal=_principal(providers=("cheap",)))
    assert [c.provider for c in route.selection.candidates] == ["cheap"]
    with pytest.raises(MeshError) as denied:
        service.route(MODEL, "chat", principal=_principal(providers=("local",)))
    assert denied.value.code is ErrorCode.PERMISSION_DENIED
    with pytest.raises(MeshError) as denied:
        service.route(f"{MODEL}:dear", "chat", principal=_principal(providers=("cheap",)))
    assert denied.value.code is ErrorCode.PERMISSION_DENIED


async def test_a_suffix_and_a_path_naming_different_providers_are_refused(routing):
    service, _, _ = routing
    principal = _principal()
    with pytest.raises(MeshError) as refused:
        service.route(f"{MODEL}:dear", "chat", provider="cheap", principal=principal)
    assert refused.value.code is ErrorCode.INVALID_INPUT and refused.value.param == "model"
    agreed = service.route(f"{MODEL}:cheap", "chat", provider="cheap", principal=principal)
    assert [c.provider for c in agreed.selection.candidates] == ["cheap"] and agreed.selection.explicit


async def test_a_catalog_model_no_provider_serves_stays_on_the_local_path(routing):
    service, _, _ = routing
    catalog_model = next(m.id for m in service.catalog.models if "feature-extraction" in m.tasks)
    route = service.route(catalog_model, "embed", principal=_principal())
    assert route.local_only and route.entry.id == catalog_model
    assert service.route(catalog_model, "embed", principal=_principal(providers=("local",))).local_only
    with pytest.raises(MeshError) as denied:  # a key kept off the local mesh
        service.route(catalog_model, "embed", principal=_principal(providers=("cheap",)))
    assert denied.value.code is ErrorCode.PERMISSION_DENIED


def test_remote_bounds_count_bytes_and_messages_within_the_context():
    chat = GenerationRequest(messages=[("system", "ab"), ("user", "é")])
    assert remote_bounds(chat, None) == ((2 + 8) + (2 + 8) + 4 + REMOTE_TEMPLATE_TOKENS, 4096)
    assert remote_bounds(GenerationRequest(prompt="x" * 100, max_new_tokens=7), 50) == (50, 7)
    assert remote_bounds(GenerationRequest(prompt="abc"), 1000) == (7, 1000)


async def test_a_remote_ranker_scores_every_document_and_is_metered(routing):
    service, _, ledger = routing
    principal = _principal()
    route = service.route(RANKER, "rerank", principal=principal)
    ranked = await service.rerank(_ctx(principal), route, "good food", ["good food here", "bad weather"], top_n=2)
    assert sorted(i for i, _ in ranked.results) == [0, 1] and ranked.results[0][0] == 0
    assert ranked.results[0][1] >= ranked.results[1][1] and ranked.model_id == RANKER
    assert ledger.record("provider") == "tei-x" and ledger.record("items") == 2
    assert ranked.input_tokens == ledger.record("input_tokens") > 0


async def test_an_hf_provider_answers_a_task_with_its_own_json_and_its_price(routing):
    service, _, ledger = routing
    principal = _principal()
    route = service.route(CLASSIFIER, "task", principal=principal)
    answer = await service.predict(_ctx(principal), route, "text-classification", b'{"inputs": "good"}')
    labels = orjson.loads(answer.content)
    assert answer.cache == "BYPASS" and {r["label"] for r in labels[0]} == {"POSITIVE", "NEGATIVE"}
    assert ledger.record("provider") == "hf-x" and ledger.record("cost_usd") == usd("0.5")
    assert answer.headers["X-Usage-Cost-USD"].startswith("0.5")


async def test_an_hf_provider_gets_a_raw_upload_with_its_type_and_the_hf_options(routing, upstreams):
    """An image sent as raw bytes reaches an `hf` provider as the caller sent it: its Content-Type
    and the HF API's X-Wait-For-Model / X-Use-Cache headers go along."""
    service, _, _ = routing
    principal = _principal()
    upstreams["cheap"].clear()
    route = service.route(CLASSIFIER, "task", principal=principal)
    image = b"\x89PNG\r\n\x1a\n" + bytes(range(24))
    headers = {"content-type": "image/png", "x-wait-for-model": "true", "x-use-cache": "false"}
    answer = await service.predict(_ctx(principal), route, "image-classification", image, headers=headers)
    assert orjson.loads(answer.content) == [{"label": f"image/png:{len(image)}", "score": 1.0}]
    (seen,) = upstreams["cheap"].requests()
    sent = {k.lower(): v for k, v in seen["headers"].items()}
    assert sent["content-type"] == "image/png"
    assert (sent["x-wait-for-model"], sent["x-use-cache"]) == ("true", "false")


async def test_an_hf_feature_extraction_body_is_served_by_an_openai_provider(routing):
    service, _, ledger = routing
    principal = _principal()
    route = service.route(f"{EMBEDDER}:dear", "embed", principal=principal)
    one = orjson.loads((await service.predict(_ctx(principal), route, "feature-extraction", {"inputs": "a b"})).content)
    many = await service.predict(_ctx(principal), route, "feature-extraction", b'{"inputs": ["a b", "c"]}')
    assert len(one) == 8 and all(isinstance(x, float) for x in one)
    assert [len(v) for v in orjson.loads(many.content)] == [8, 8] and ledger.record("provider") == "dear"
    with pytest.raises(MeshError) as refused:
        await service.predict(_ctx(principal), route, "feature-extraction", b'{"inputs": 3}')
    assert refused.value.code is ErrorCode.INVALID_INPUT and refused.value.param == "inputs"


# -- a catalog model the local mesh and a remote provider both serve ---------------------------------
CHAT = "meshserve/tiny-llama-chat"
SENTIMENT = "meshserve/sentiment-minilm"


def _sentiment_task():
    """The HF request `{"inputs": "good"}` as the routes parse it for the local mesh."""
    from meshserve.tasks.v1 import tasks_pb2

    def render(result) -> bytes:
        return orjson.dumps([[{"label": c.label, "score": c.score} for c in item.labels]
                             for item in result.classifications.items])  # fmt: skip

    inputs = tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=["good"]))
    return LocalTask(inputs, tasks_pb2.TaskParameters(), render)


async def _mixed(tmp_path, upstreams, ports: dict[str, int]):
    """RoutingService over a pipeline at `ports` (pre, inference, post) and the cheap fake, with the
    local mesh first (preferred) for the catalog's chat model."""
    from services.gateway.main import build_pipeline
    from services.gateway.pipeline.cache import ResponseCache
    from services.gateway.service.embed import EmbedService
    from services.gateway.service.generate import GenerateService
    from services.gateway.service.predict import PredictService
    from services.gateway.settings import GatewaySettings

    for fake in upstreams.values():
        fake.reset()
        fake.clear()
    settings = GatewaySettings(
        home=str(tmp_path), auth=False, ledger=False, request_timeout_s=20, upstream_attempts=1,
        preprocess_address=f"127.0.0.1:{ports['pre']}", inference_address=f"127.0.0.1:{ports['inference']}",
        postprocess_address=f"127.0.0.1:{ports['post']}",
    )  # fmt: skip
    pipeline = build_pipeline(settings)
    path = tmp_path / "mixed.yaml"
    cheap = {"name": "cheap", "kind": "openai", "base_url": upstreams["cheap"].url + "/v1",
             "pricing": PRICES["cheap"], "models": {CHAT: "fake-chat"}}  # fmt: skip
    hf = {"name": "hf-x", "kind": "hf", "base_url": upstreams["cheap"].url, "models": {SENTIMENT: "fake-sentiment"}}
    path.write_text(yaml.safe_dump({"routing": {"policy": "preferred", "backoff_base_s": 0.001},
                                    "providers": [{"name": "local", "kind": "local"}, cheap, hf]}))  # fmt: skip
    providers = Providers.from_config(load_providers(path), pipeline.catalog)
    ledger = ListLedger()
    metering = Metering(None, ledger, timeout_s=5.0)
    generate = GenerateService(pipeline, metering)
    embed = EmbedService(pipeline, metering)
    predict = PredictService(pipeline, metering, ResponseCache(max_bytes=0, max_entry_bytes=0, ttl_s=1), embed)
    service = RoutingService(providers, pipeline.catalog, metering, embed, generate, predict, timeout_s=20.0)
    return service, ledger, pipeline, providers


async def test_a_local_mesh_that_is_down_fails_over_to_the_remote_provider(tmp_path, upstreams):
    from tests.helpers import free_port

    ports = {"pre": free_port(), "inference": free_port(), "post": free_port()}  # nothing listens
    service, ledger, pipeline, providers = await _mixed(tmp_path, upstreams, ports)
    try:
        principal = _principal()
        route = service.route(CHAT, "chat", principal=principal)
        assert [c.provider for c in route.selection.candidates] == ["local", "cheap"] and not route.local_only
        request = GenerationRequest(messages=[("user", "hello you")], max_new_tokens=3)
        generation = await service.start(_ctx(principal), route, request, op="chat", stream=True)
        text, failure = await _drain(generation)
        task_route = service.route(SENTIMENT, "task", principal=principal)
        answer = await service.predict(
            _ctx(principal, "req-2"), task_route, "text-classification", b'{"inputs": "good"}', local=_sentiment_task
        )
    finally:
        await providers.close()
        await pipeline.close()
    assert {r["label"] for r in orjson.loads(answer.content)[0]} == {"POSITIVE", "NEGATIVE"}
    assert (ledger.record("provider"), ledger.record("attempts")) == ("hf-x", 2)
    ledger.rows.pop()
    assert failure is None and text == "tok0 tok1 tok2"
    assert (ledger.record("provider"), ledger.record("attempts"), ledger.record("output_tokens")) == ("cheap", 2, 3)
    assert ledger.record("cost_usd") == usd(CHEAP_SPEC.cost(2, 3, 0.0))


# The session meshes live on the worker of the "mesh" group: running there, these tests start none.
ON_MESH_WORKER = pytest.mark.xdist_group("mesh")


@ON_MESH_WORKER
async def test_the_local_mesh_answers_a_routed_generation_with_its_own_counts(
    tmp_path, upstreams, mesh, catalog, monkeypatch
):
    if hasattr(mesh, "service_token"):  # stages that require the service credential
        monkeypatch.setenv("MESHSERVE_SERVICE_TOKEN", mesh.service_token)
    service, ledger, pipeline, providers = await _mixed(tmp_path, upstreams, mesh.ports)
    try:
        principal = _principal()
        route = service.route(f"{CHAT}:preferred", "completion", principal=principal)
        # Greedy, end token masked: an unseeded sample could end at once with no text (seen in CI).
        request = GenerationRequest(prompt="def main():", max_new_tokens=4, min_new_tokens=4, temperature=0.0)
        generation = await service.start(_ctx(principal), route, request, op="completion", stream=True)
        text, failure = await _drain(generation)
    finally:
        await providers.close()
        await pipeline.close()
    assert failure is None and text and upstreams["cheap"].requests() == []  # the first candidate answered
    assert (ledger.record("provider"), ledger.record("attempts"), ledger.record("upstream_request_id")) == (
        "local", 1, None,
    )  # fmt: skip
    assert ledger.record("input_tokens") == generation.prepared.prompt_tokens > 0
    assert ledger.record("output_tokens") == 4
    expected = catalog.get(CHAT).pricing.cost(ledger.record("input_tokens"), ledger.record("output_tokens"),
                                              ledger.record("compute_s"))  # fmt: skip
    assert ledger.record("cost_usd") == usd(expected)  # exact


async def test_usage_reports_group_and_filter_by_provider(tmp_path):
    from services.gateway.ledger import UsageReports

    engine = make_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate.upgrade(engine)
    base = (None, "m", "text-generation")
    tail = (1, 2, 1, 0.0, 0.5, 200, 0.1, None, 1.7e9, "/v1/completions", None)
    rows = [(f"r{i}", *base, provider, *tail, 1, None) for i, provider in enumerate(["local", "cheap", "cheap"])]
    assert insert_rows(engine, rows)[1] == 3
    reports = UsageReports(engine)
    totals = await reports.totals(by="provider")
    assert [(t["provider"], t["requests"], t["cost_usd"]) for t in totals] == [("cheap", 2, 1.0), ("local", 1, 0.5)]
    assert {r["request_id"] for r in await reports.query(provider="cheap")} == {"r1", "r2"}
    assert await reports.count(provider="local") == 1


def test_the_admin_key_request_takes_providers_as_the_api_and_cli_send_them(tmp_path):
    from services.gateway.service.admin import KeyRequest, create_key
    from services.gateway.service.validation import parse

    store = KeyStore(make_engine(f"sqlite:///{tmp_path / 'keys.db'}"))
    store.init_schema()
    key, _ = create_key(store, parse(KeyRequest, {"name": "p", "providers": ["local", "mesh-b"]}))
    assert key.public()["providers"] == ["local", "mesh-b"]
    with pytest.raises(MeshError) as refused:
        create_key(store, parse(KeyRequest, {"name": "p", "providers": ["Not A Name"]}))
    assert refused.value.param == "providers"


@ON_MESH_WORKER
async def test_the_local_mesh_answers_a_routed_task_the_routes_parsed_for_it(tmp_path, upstreams, mesh, monkeypatch):
    if hasattr(mesh, "service_token"):
        monkeypatch.setenv("MESHSERVE_SERVICE_TOKEN", mesh.service_token)
    service, ledger, pipeline, providers = await _mixed(tmp_path, upstreams, mesh.ports)
    try:
        principal = _principal()
        route = service.route(SENTIMENT, "task", principal=principal)
        assert [c.provider for c in route.selection.candidates] == ["local", "hf-x"]
        body = b'{"inputs": "good"}'
        answer = await service.predict(_ctx(principal), route, "text-classification", body, local=_sentiment_task)
        remote_only = await service.predict(_ctx(principal, "req-2"), route, "text-classification", body)
    finally:
        await providers.close()
        await pipeline.close()
    labels = orjson.loads(answer.content)[0]
    assert {r["label"] for r in labels} == {"POSITIVE", "NEGATIVE"} and labels[0]["score"] >= labels[1]["score"]
    assert (ledger.record("provider", 0), ledger.record("attempts", 0)) == ("local", 1)
    assert ledger.record("input_tokens", 0) > 0 and ledger.record("items", 0) == 1
    assert ledger.record("provider", 1) == "hf-x" and orjson.loads(remote_only.content)  # no parsed request: remote

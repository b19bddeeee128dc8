"""Out-of-range numbers and too many stop strings are a 400 (INVALID_ARGUMENT on gRPC) that names
the field, in the caller's dialect, on every route that parses them, never a 500 from an overflow
deeper in the mesh; a key's budget is capped so no key can break its own requests; a stream whose
stage is down fails before its 200, in the caller's dialect, as the real clients raise it."""

from __future__ import annotations

import time

import grpc
import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import OverloadedError
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from services.common.errors import MeshError
from services.gateway.control.keys import KeyStore
from tests.helpers import GatewayProcess, free_port, start_mesh

pytestmark = pytest.mark.xdist_group("number-ranges")

ADMIN = "msk_admin_ranges-admin-token-0123456789abcdefghijklmnopqrstuvwxyz"
LM = "meshserve/tiny-llama-chat"
SENTIMENT = "meshserve/sentiment-minilm"
CHAT = {"model": LM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
STOPS_17 = [f"stop{i}" for i in range(17)]


@pytest.fixture(scope="module")
def ranges(tmp_path_factory, models_dir):
    """A mesh with auth on (keys in a throwaway SQLite file, budgets in process), an inference key,
    and the gateway whose postprocess is away."""
    tmp = tmp_path_factory.mktemp("ranges")
    db = tmp / "gateway.db"
    env = {
        "MESHSERVE_GATEWAY_AUTH": "true",
        "MESHSERVE_GATEWAY_LEDGER": "false",
        "MESHSERVE_ADMIN_TOKEN": ADMIN,
        "MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{db}",
    }
    mesh = start_mesh(tmp, env)
    try:
        token = create_key(mesh.url).json()["token"]
        # postprocess's address has nothing listening: a generation gets its 200 and first event,
        # then fails at the first token (/health: its /readyz is 503 with postprocess away)
        away = {"MESHSERVE_GATEWAY_POSTPROCESS_ADDRESS": f"127.0.0.1:{free_port()}"}
        broken = GatewayProcess(mesh, tmp / "gateway-no-postprocess.log", away, ready_path="/health")
    except BaseException:
        mesh.stop()
        raise
    yield mesh, token, broken, db
    broken.stop()
    mesh.stop()


def create_key(url: str, **spec) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN}"}
    return httpx.post(url + "/admin/keys", json={"name": "ranges", **spec}, headers=headers, timeout=30)


# (route, body, the field the error must name). Each was a 500 before these checks.
OPENAI_CASES = [
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2**32}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2**32}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**63}, "seed"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**63, "stream": True}, "seed"),
    ("/v1/chat/completions", {**CHAT, "stop": STOPS_17}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": STOPS_17, "stream": True}, "stop"),
    ("/v1/completions", {"model": LM, "prompt": "hi", "max_tokens": 2**32}, "max_tokens"),
    ("/v1/completions", {"model": LM, "prompt": "hi", "seed": 2**63, "stream": True}, "seed"),
]
HF_CASES = [
    (f"/models/{LM}", {"inputs": "hi", "parameters": {"max_new_tokens": 2**32}}, "parameters.max_new_tokens"),
    (f"/models/{LM}", {"inputs": "hi", "parameters": {"top_k": 2**63}}, "parameters.top_k"),
    (f"/models/{LM}", {"inputs": "hi", "parameters": {"seed": 2**63}}, "parameters.seed"),
    (f"/models/{LM}", {"inputs": "hi", "parameters": {"stop": STOPS_17}}, "parameters.stop"),
    (f"/models/{LM}", {"inputs": "hi", "stream": True, "parameters": {"top_k": 2**63}}, "parameters.top_k"),
    (f"/models/{SENTIMENT}", {"inputs": "a fine day", "parameters": {"top_k": 2**32}}, "parameters.top_k"),
]
ADMIN_CASES = [
    ({"expires_in_s": 1e20}, "expires_in_s"),
    ({"budget_usd": 1e305, "budget_period": "total"}, "budget_usd"),
    ({"requests_per_minute": 2**63}, "requests_per_minute"),
]


@pytest.mark.parametrize(("path", "body", "field"), OPENAI_CASES, ids=[f"{p}:{f}" for p, b, f in OPENAI_CASES])
def test_openai_routes_refuse_out_of_range_numbers_with_a_400_naming_the_field(ranges, path, body, field):
    mesh, token, _, _ = ranges
    reply = httpx.post(mesh.url + path, json=body, headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field
    assert error["type"] == "invalid_request_error"
    assert field in error["message"]


@pytest.mark.parametrize(("path", "body", "field"), HF_CASES, ids=[f"{p}:{f}" for p, b, f in HF_CASES])
def test_hf_routes_refuse_out_of_range_numbers_with_a_400_naming_the_field(ranges, path, body, field):
    mesh, token, _, _ = ranges
    reply = httpx.post(mesh.url + path, json=body, headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error_type"] == "validation"
    assert field in reply.json()["error"]


@pytest.mark.parametrize(("spec", "field"), ADMIN_CASES, ids=[f for _, f in ADMIN_CASES])
def test_admin_key_creation_refuses_out_of_range_numbers(ranges, spec, field):
    mesh, _, _, _ = ranges
    reply = create_key(mesh.url, **spec)
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["error"]


def test_a_key_with_the_largest_budget_works(ranges):
    """The largest budget a key may have (a billion USD: 1e18 nano-dollars) is counted exactly,
    not a failure on each of its requests; a larger one is refused even straight into the store,
    past the API's check. (A key stored with a larger one before the cap: migration 0003 makes it
    the cap, test_key_migrations.)"""
    import sqlalchemy as sa

    mesh, _, _, db = ranges
    store = KeyStore(sa.create_engine(f"sqlite:///{db}"))
    with pytest.raises(MeshError, match="budget_usd"):
        store.create("huge", ["inference", "read"], budget_usd=1e305, budget_period="total")
    _, token = store.create("largest", ["inference", "read"], budget_usd=1e9, budget_period="total")
    body = {"inputs": "a fine day"}
    deadline = time.monotonic() + 30
    while (reply := httpx.post(f"{mesh.url}/models/{SENTIMENT}", json=body, headers={"authorization": f"Bearer {token}"}, timeout=30)).status_code == 401:  # fmt: skip
        assert time.monotonic() < deadline, "the gateway never loaded the new key"
        time.sleep(0.25)  # the gateway reloads keys from the database every key_refresh_s
    assert reply.status_code == 200, reply.text
    again = httpx.post(f"{mesh.url}/models/{SENTIMENT}", json=body, headers={"authorization": f"Bearer {token}"})
    assert again.status_code == 200, again.text


GRPC_CASES = [
    (tasks_pb2.GenerationParameters(seed=2**63), "parameters.seed"),
    (tasks_pb2.GenerationParameters(stop=STOPS_17), "parameters.stop"),
    (tasks_pb2.GenerationParameters(stop=["x" * 257]), "parameters.stop"),
    (tasks_pb2.GenerationParameters(temperature=float("nan")), "parameters.temperature"),
    (tasks_pb2.GenerationParameters(top_p=float("inf")), "parameters.top_p"),
    (tasks_pb2.GenerationParameters(repetition_penalty=float("inf")), "parameters.repetition_penalty"),
]


@pytest.mark.parametrize(("parameters", "field"), GRPC_CASES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(GRPC_CASES)])
def test_grpc_generate_refuses_out_of_range_parameters_with_invalid_argument(ranges, parameters, field):
    mesh, token, _, _ = ranges
    request = gateway_pb2.GenerateRequest(model_id=LM, prompt="hi", parameters=parameters)
    request.parameters.max_new_tokens = 4
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, metadata=[("authorization", f"Bearer {token}")], timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()


def test_a_stream_that_fails_before_its_first_token_is_a_503_the_openai_client_raises(ranges):
    """The stream's first step is awaited before the 200 (services/gateway/api/generation_responses.py):
    a stage that is down is a 503 in OpenAI's shape, retryable, not a 200 and then an error event.
    (A failure after tokens went out ends with an error event: tests/providers/test_e2e_kill.py.)"""
    _, token, broken, _ = ranges
    client = openai.OpenAI(base_url=broken.url + "/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**CHAT, stream=True)
    assert err.value.status_code == 503
    assert err.value.body["code"] == "upstream_unavailable"
    assert err.value.body["type"] == "service_unavailable"


def test_a_tgi_stream_that_fails_before_its_first_token_is_a_tgi_503(ranges):
    _, token, broken, _ = ranges
    with httpx.stream(
        "POST", f"{broken.url}/models/{LM}", json={"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 4}},
        headers={"authorization": f"Bearer {token}"}, timeout=30,
    ) as reply:  # fmt: skip
        reply.read()
    assert reply.status_code == 503 and reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert isinstance(body["error"], str) and body["error"]  # TGI's shape: the message itself
    assert body["error_type"] == "overloaded"
    client = InferenceClient(base_url=f"{broken.url}/models/{LM}", api_key=token)
    with pytest.raises(OverloadedError):  # huggingface_hub's typed error for the body's error_type
        list(client.text_generation("hi", max_new_tokens=4, stream=True))

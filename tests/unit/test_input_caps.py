"""Per-request input caps, refused where the request is parsed: before admission, before any work
that grows with the input, and before the gateway calls a stage. The gateway here is the real
ASGI app and the real grpc.aio server, its stages an address where nothing listens: a request that
got past the caps would be answered 503/UNAVAILABLE by the missing preprocess, not 400/413."""

from __future__ import annotations

import base64
import io
import json
import tracemalloc

import grpc
import httpx
import pytest
from meshserve.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2
from PIL import Image, ImageFile

from services.common import caps, grpc_server, images
from services.common.catalog import ImageSpec
from services.common.errors import ErrorCode, MeshError
from services.common.settings import GrpcServiceSettings
from services.gateway.api.grpc_servicer import GatewayServicer
from services.gateway.api.http_app import create_app, wrap
from services.gateway.control.plane import ControlPlane
from services.gateway.main import SERVICE_NAME, build_pipeline
from services.gateway.pipeline.generation import GenerationRequest
from services.gateway.service import GatewayServices
from services.gateway.service.bounds import text_token_bound, zero_shot_token_bound
from services.gateway.settings import GatewaySettings
from services.preprocess.core import ImagePreprocessor
from tests.helpers import MODEL_ID, texts

DIGITS = "meshserve/digits-cnn"
LABELS = [f"label number {i}" for i in range(1000)]
NOWHERE = "127.0.0.1:9"  # discard port: nothing listens


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 4096 x 4096 PNG (at the per-image cap) of one colour: a few KB that decode to 16 MB."""
    buffer = io.BytesIO()
    Image.new("L", (4096, 4096), 0).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 64 * 1024
    return buffer.getvalue()


@pytest.fixture
async def gateway(tmp_path):
    """(REST client, gRPC stub) of one gateway whose stages are unreachable."""
    settings = GatewaySettings(
        home=str(tmp_path), auth=False, ledger=False, coalesce=False, upstream_attempts=1,
        preprocess_address=NOWHERE, inference_address=NOWHERE, postprocess_address=NOWHERE,
    )  # fmt: skip
    pipeline = build_pipeline(settings)
    services = GatewayServices.build(settings, pipeline)
    binding = grpc_server.Binding(
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server, GatewayServicer(services), SERVICE_NAME
    )
    server = await grpc_server.create_server(
        GrpcServiceSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1), "gateway", [binding]
    )
    app = wrap(create_app(settings, services), settings)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield client, gateway_pb2_grpc.GatewayServiceStub(channel)
    await server.stop(0)
    await pipeline.close()


# -- zero-shot: labels and template ---------------------------------------------------------------
def test_zero_shot_bound_is_arithmetic_and_builds_no_hypotheses(catalog):
    entry = catalog.get(MODEL_ID)
    template = "x" * 100_000 + " {}."  # 1,000 hypotheses of it would be 100 MB
    tracemalloc.start()
    bound = zero_shot_token_bound(entry, ["a text"], LABELS, template)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1024 * 1024
    assert bound == text_token_bound(entry, ["a text"]) + 1000 * entry.preprocess.max_length


def test_zero_shot_bound_equals_the_bound_of_the_built_hypotheses(catalog):
    entry = catalog.get(MODEL_ID)
    labels, template, sentences = ["sport", "politique", "économie"], "Ce texte parle de {}.", ["un", "deux"]
    hypotheses = [template.replace("{}", label) for label in labels]
    expected = text_token_bound(entry, sentences) + len(sentences) * text_token_bound(entry, hypotheses)
    assert zero_shot_token_bound(entry, sentences, labels, template) == expected
    default = entry.postprocess.zero_shot.hypothesis_template
    assert zero_shot_token_bound(entry, sentences, labels, None) == zero_shot_token_bound(
        entry, sentences, labels, default
    )


async def test_a_thousand_candidate_labels_are_refused_at_the_gateway_naming_the_cap(gateway):
    client, stub = gateway
    body = {"inputs": "a text", "parameters": {"candidate_labels": LABELS, "hypothesis_template": "About {}."}}
    reply = await client.post(f"/models/{MODEL_ID}/pipeline/zero-shot-classification", json=body)
    assert reply.status_code == 400, reply.text
    assert "candidate_labels" in reply.json()["error"] and "the limit is 64" in reply.json()["error"]
    request = gateway_pb2.PredictRequest(
        model_id=MODEL_ID,
        task=tasks_pb2.TASK_ZERO_SHOT_CLASSIFICATION,
        inputs=texts("a text"),
        parameters=tasks_pb2.TaskParameters(candidate_labels=LABELS, hypothesis_template="About {}."),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidate_labels" in err.value.details() and "the limit is 64" in err.value.details()


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"candidate_labels": ["a", "b" * 300]}, f"the limit is {caps.MAX_LABEL_CHARS}"),
        ({"candidate_labels": ["a", "b"], "hypothesis_template": "x" * 5000 + "{}"}, "hypothesis_template"),
    ],
)
async def test_long_labels_and_templates_are_refused_on_rest_and_grpc(gateway, parameters, named):
    client, stub = gateway
    reply = await client.post(f"/models/{MODEL_ID}/pipeline/zero-shot-classification",
                              json={"inputs": "a text", "parameters": parameters})  # fmt: skip
    assert reply.status_code == 400 and named in reply.json()["error"], reply.text
    request = gateway_pb2.PredictRequest(
        model_id=MODEL_ID,
        task=tasks_pb2.TASK_ZERO_SHOT_CLASSIFICATION,
        inputs=texts("a text"),
        parameters=tasks_pb2.TaskParameters(**parameters),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in err.value.details()


async def test_too_many_texts_are_refused_on_grpc_before_any_stage(gateway, catalog):
    _, stub = gateway
    limit = catalog.get(MODEL_ID).preprocess.max_items
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(gateway_pb2.PredictRequest(model_id=MODEL_ID, inputs=texts(*["t"] * (limit + 1))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {limit}" in err.value.details()


# -- images: count x pixels, from the headers -----------------------------------------------------
async def test_sixteen_4096_pixel_pngs_are_refused_at_the_gateway(gateway, big_png):
    client, stub = gateway
    body = json.dumps({"inputs": [base64.b64encode(big_png).decode()] * 16})
    assert len(body) < 1024 * 1024  # a small request: 16 x 4096 x 4096 = 268 M pixels
    reply = await client.post(f"/models/{DIGITS}", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 413, reply.text
    assert f"the limit is {images.MAX_REQUEST_PIXELS} pixels per request" in reply.json()["error"]
    images_pb = tasks_pb2.TaskInputs(images=tasks_pb2.ImageInputs(images=[big_png] * 16))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(gateway_pb2.PredictRequest(model_id=DIGITS, inputs=images_pb))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{images.MAX_REQUEST_PIXELS} pixels per request" in err.value.details()


def test_preprocess_refuses_sixteen_large_images_without_decoding_one(catalog, big_png, monkeypatch):
    decoded = []
    load = ImageFile.ImageFile.load

    def counting_load(image):  # observes Pillow's decoder; the decoding itself is unchanged
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    pre = ImagePreprocessor(catalog.get(DIGITS))
    with pytest.raises(MeshError) as err:
        pre.encode([big_png] * 16, field="inputs")
    assert err.value.code is ErrorCode.PAYLOAD_TOO_LARGE and err.value.param == "inputs"
    assert decoded == []
    assert pre.encode([big_png] * 2, field="inputs").items == 2  # within the caps: decoded as before
    assert decoded  # the counter sees real decodes


def test_image_headers_give_sizes_and_caps_without_decoding(big_png):
    assert images.header_size(big_png) == (4096, 4096)
    spec = ImageSpec(width=8, height=8, mode="L", max_pixels=4096 * 4096)
    assert images.check_sizes([big_png] * 4, spec) == 4 * 4096 * 4096
    with pytest.raises(MeshError) as err:
        images.check_sizes([big_png] * 5, spec)
    assert err.value.code is ErrorCode.PAYLOAD_TOO_LARGE and "over 5 images" in err.value.message
    small = ImageSpec(width=8, height=8, mode="L", max_pixels=1000)
    with pytest.raises(MeshError) as err:
        images.check_sizes([big_png], small)
    assert "4096x4096" in err.value.message and "at most 1000 pixels per image" in err.value.message


# -- generation: admitted before its prompt is tokenized ------------------------------------------
@pytest.fixture
async def authed_gateway(tmp_path):
    """(REST client, key store) of a gateway with auth and the in-process limiter; stages unreachable."""
    settings = GatewaySettings(
        home=str(tmp_path), auth=True, ledger=False, coalesce=False, upstream_attempts=1,
        admin_token="msk_admin_input-caps-0123456789abcdefghijklmnopqrstuvwxyz",
        database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
        preprocess_address=NOWHERE, inference_address=NOWHERE, postprocess_address=NOWHERE,
    )  # fmt: skip
    control = ControlPlane.from_settings(settings)
    await control.start(settings)
    pipeline = build_pipeline(settings)
    app = wrap(create_app(settings, GatewayServices.build(settings, pipeline, control=control)), settings, control.auth)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        yield client, control.keys
    await pipeline.close()
    await control.close()


async def test_a_key_at_its_request_limit_is_refused_before_preprocess_is_called(authed_gateway):
    client, keys = authed_gateway
    _, token = keys.create("limited", ["inference"], requests_per_minute=1)
    await keys.reload()
    auth = {"authorization": f"Bearer {token}"}
    chat = {"model": "meshserve/tiny-llama-chat", "messages": [{"role": "user", "content": "Hi"}]}
    first = await client.post("/v1/chat/completions", json=chat, headers=auth)
    assert first.status_code == 503  # admitted (its request counted), then preprocess is unreachable
    long = {**chat, "messages": [{"role": "user", "content": "word " * 40_000}]}
    second = await client.post("/v1/chat/completions", json=long, headers=auth)
    assert second.status_code == 429, second.text  # had preprocess been called: 503 again
    assert second.json()["error"]["code"] == "rate_limited"


def test_generation_bounds_hold_the_most_a_prompt_can_cost_and_estimate_the_tokens(catalog):
    entry = catalog.get("meshserve/tiny-llama-chat")  # prompt <= 448 tokens, prompt + new <= 512
    prompt = GenerationRequest(prompt="héllo", max_new_tokens=10)
    assert prompt.token_bounds(entry) == (len("héllo".encode()) + 4, 10)
    assert GenerationRequest(prompt="x" * 10_000).token_bounds(entry) == (448, 128)  # the model's default
    chat = GenerationRequest(messages=[("system", "Be brief."), ("user", "Hi")], max_new_tokens=1000)
    assert chat.token_bounds(entry) == (448, 512)  # a template the gateway cannot see: the prompt limit
    assert chat.tokens_estimate(entry) == len("Be brief.") + len("Hi") + 2 * 8 + 4 + 512


async def test_a_short_chat_fits_a_tokens_per_minute_limit_below_the_prompt_limit(authed_gateway):
    client, keys = authed_gateway
    _, token = keys.create("small", ["inference"], tokens_per_minute=100)
    await keys.reload()
    chat = {"model": "meshserve/tiny-llama-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    reply = await client.post("/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {token}"})
    assert reply.status_code == 503, reply.text  # admitted (not 429 "request too large"); no preprocess here

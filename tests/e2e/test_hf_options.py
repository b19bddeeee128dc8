"""HF `options`: the response cache (`use_cache`) and cold models (`wait_for_model`)."""

from __future__ import annotations

import time

import httpx
import pytest
import tritonclient.grpc as triton

from services.models.builders import digits

pytestmark = pytest.mark.xdist_group("mesh")

SENTIMENT = "meshserve/sentiment-minilm"
DIGITS = "meshserve/digits-cnn"


def cache_lookups(mesh, result: str) -> float:
    text = httpx.get(f"{mesh.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("meshserve_gateway_cache_lookups_total{") and f'result="{result}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_repeated_request_is_answered_from_the_cache(mesh):
    body = {"inputs": f"cache probe {time.time_ns()}: what a lovely afternoon"}
    hits = cache_lookups(mesh, "hit")
    first = httpx.post(f"{mesh.url}/models/{SENTIMENT}", json=body)
    second = httpx.post(f"{mesh.url}/models/{SENTIMENT}", json=body)
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
    assert first.json() == second.json()
    assert cache_lookups(mesh, "hit") == hits + 1
    # Other parameters are another key.
    other = httpx.post(f"{mesh.url}/models/{SENTIMENT}", json={**body, "parameters": {"top_k": 1}})
    assert other.headers["x-cache"] == "MISS" and len(other.json()[0]) == 1


def test_use_cache_false_recomputes_in_body_and_header_form(mesh):
    body = {"inputs": f"cache probe {time.time_ns()}: dreadful queue"}
    httpx.post(f"{mesh.url}/models/{SENTIMENT}", json=body)
    bypass = httpx.post(f"{mesh.url}/models/{SENTIMENT}", json={**body, "options": {"use_cache": False}})
    header = httpx.post(f"{mesh.url}/models/{SENTIMENT}", json=body, headers={"x-use-cache": "false"})
    assert bypass.headers["x-cache"] == header.headers["x-cache"] == "BYPASS"


def _unload(mesh, name: str) -> triton.InferenceServerClient:
    client = mesh.authorize(triton.InferenceServerClient(mesh.inference_target))
    client.unload_model(name)
    deadline = time.monotonic() + 30
    while client.is_model_ready(name) and time.monotonic() < deadline:  # Triton unloads in the background
        time.sleep(0.1)
    assert not client.is_model_ready(name)
    return client


def test_cold_model_answers_503_with_estimated_time_then_serves(mesh):
    client = _unload(mesh, "digits-cnn")
    image = digits.render_png(digits.split()[2][0])
    reply = httpx.post(f"{mesh.url}/models/{DIGITS}", content=image, headers={"x-use-cache": "false"})
    try:
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"] == f"Model {DIGITS} is currently loading"
        assert reply.json()["estimated_time"] > 0
        assert int(reply.headers["retry-after"]) >= 1
        deadline = time.monotonic() + 60
        while not client.is_model_ready("digits-cnn") and time.monotonic() < deadline:
            time.sleep(0.1)  # the first request started the load
        assert client.is_model_ready("digits-cnn")
    finally:
        client.load_model("digits-cnn")


def test_wait_for_model_waits_for_a_cold_model(mesh):
    client = _unload(mesh, "sentiment-minilm")
    try:
        body = {"inputs": "wonderful", "options": {"wait_for_model": True, "use_cache": False}}
        reply = httpx.post(f"{mesh.url}/models/{SENTIMENT}", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()[0][0]["label"] == "POSITIVE"
        assert client.is_model_ready("sentiment-minilm")
    finally:
        client.load_model("sentiment-minilm")


def test_wait_for_model_header_form(mesh):
    client = _unload(mesh, "sentiment-minilm")
    try:
        reply = httpx.post(
            f"{mesh.url}/models/{SENTIMENT}",
            json={"inputs": "awful"},
            headers={"x-wait-for-model": "true", "x-use-cache": "false"},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
    finally:
        client.load_model("sentiment-minilm")

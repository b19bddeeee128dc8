"""Concurrent embeddings, text-classification and image-classification requests share pipeline
calls, and each caller still gets exactly its own vectors or labels, its own token count and its
own error."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest

from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")


def coalesced_rows(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    total = float(re.search(r"^meshserve_gateway_coalesced_rows_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^meshserve_gateway_coalesced_rows_count (\S+)", text, re.M).group(1))
    return total, count


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=len(bodies))) as client:
        return await asyncio.gather(*(client.post(url, json=b) for b in bodies))


def test_concurrent_requests_share_calls_and_get_their_own_vectors(mesh, reference_encoder):
    texts = [f"concurrent request {i} asks about {'cats dogs birds fish'.split()[i % 4]}" for i in range(48)]
    rows_before, calls_before = coalesced_rows(mesh.url)
    replies = asyncio.run(post_all(f"{mesh.url}/models/{MODEL_ID}", [{"inputs": t} for t in texts]))
    assert all(r.status_code == 200 for r in replies)
    ours = np.array([r.json() for r in replies])
    np.testing.assert_allclose(ours, reference_encoder.encode(texts, normalize_embeddings=True), atol=1e-5)
    rows_after, calls_after = coalesced_rows(mesh.url)
    assert rows_after - rows_before == len(texts)
    assert calls_after - calls_before < len(texts), "concurrent requests must be merged"


def test_usage_is_split_back_per_request(mesh):
    texts = ["one", "two words", "now three words", "and this one has five"]
    alone = [
        httpx.post(f"{mesh.url}/v1/embeddings", json={"model": MODEL_ID, "input": t}).json()["usage"]["prompt_tokens"]
        for t in texts
    ]
    bodies = [{"model": MODEL_ID, "input": t} for t in texts] * 6
    together = asyncio.run(post_all(f"{mesh.url}/v1/embeddings", bodies))
    assert [r.json()["usage"]["prompt_tokens"] for r in together] == alone * 6


def test_one_bad_request_in_a_group_fails_alone(mesh):
    bodies = [{"model": MODEL_ID, "input": f"fine sentence {i}"} for i in range(20)]
    bodies[7] = {"model": MODEL_ID, "input": "word " * 600}  # over the token limit: 400 on /v1
    replies = asyncio.run(post_all(f"{mesh.url}/v1/embeddings", bodies))
    assert replies[7].status_code == 400 and replies[7].json()["error"]["code"] == "invalid_input"
    assert [r.status_code for i, r in enumerate(replies) if i != 7] == [200] * 19


def test_concurrent_text_classification_is_merged_and_each_caller_gets_its_own_labels(mesh):
    url = f"{mesh.url}/models/meshserve/sentiment-minilm"
    texts = [
        f"review {i}: " + ("I loved every minute of it" if i % 2 else "a waste of money, it broke") for i in range(40)
    ]
    alone = [httpx.post(url, json={"inputs": t}, headers={"x-use-cache": "false"}).json() for t in texts[:4]]
    rows_before, calls_before = coalesced_rows(mesh.url)

    async def post_uncached():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=len(texts))) as client:
            headers = {"x-use-cache": "false"}
            return await asyncio.gather(*(client.post(url, json={"inputs": t}, headers=headers) for t in texts))

    replies = asyncio.run(post_uncached())
    assert all(r.status_code == 200 for r in replies)
    labels = [r.json()[0][0]["label"] for r in replies]
    assert labels == ["POSITIVE" if i % 2 else "NEGATIVE" for i in range(40)]
    for merged, single in zip(replies[:4], alone, strict=True):
        assert merged.json()[0][0]["label"] == single[0][0]["label"]
        assert merged.json()[0][0]["score"] == pytest.approx(single[0][0]["score"], abs=1e-5)
    rows_after, calls_after = coalesced_rows(mesh.url)
    assert rows_after - rows_before == len(texts)
    assert calls_after - calls_before < len(texts), "concurrent requests must be merged"


IMAGE_URL = "/models/meshserve/digits-cnn"
NO_CACHE = {"content-type": "image/png", "x-use-cache": "false"}


def digit_pngs(count: int) -> list[bytes]:
    from services.models.builders import digits

    held_out = digits.split()[2]
    return [digits.render_png(held_out[i % len(held_out)]) for i in range(count)]


def corrupt(png: bytes) -> bytes:
    """A PNG whose header is fine (the gateway's header check passes) but whose pixel data is not:
    only preprocess's decoder finds out, inside a merged call."""
    at = png.index(b"IDAT") + 4
    return png[:at] + bytes(b ^ 0x5A for b in png[at : at + 16]) + png[at + 16 :]


def warm(url: str, png: bytes) -> None:
    """The model loaded before the merged calls (a cold model answers 503 to callers that do not wait)."""
    reply = httpx.post(url, content=png, headers={**NO_CACHE, "x-wait-for-model": "true"}, timeout=120)
    assert reply.status_code == 200, reply.text


async def post_images(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=len(bodies))) as client:
        return await asyncio.gather(*(client.post(url, content=b, headers=NO_CACHE) for b in bodies))


def test_concurrent_image_requests_are_merged_and_each_gets_its_single_answer(mesh):
    pngs = digit_pngs(48)
    url = mesh.url + IMAGE_URL
    warm(url, pngs[0])
    singles = [httpx.post(url, content=png, headers=NO_CACHE) for png in pngs]
    assert all(r.status_code == 200 for r in singles), [r.text for r in singles if r.status_code != 200][:1]
    rows_before, calls_before = coalesced_rows(mesh.url)
    replies = asyncio.run(post_images(url, pngs))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200][:1]
    for merged, single in zip(replies, singles, strict=True):
        ours, alone = merged.json(), single.json()
        assert [item["label"] for item in ours] == [item["label"] for item in alone]
        np.testing.assert_allclose([i["score"] for i in ours], [i["score"] for i in alone], atol=1e-5)
    rows_after, calls_after = coalesced_rows(mesh.url)
    assert rows_after - rows_before == len(pngs)
    assert calls_after - calls_before < len(pngs), "concurrent image requests must be merged"


def test_one_corrupt_image_in_a_group_fails_only_its_caller(mesh):
    pngs = digit_pngs(24)
    url = mesh.url + IMAGE_URL
    warm(url, pngs[0])
    alone = httpx.post(url, content=corrupt(pngs[5]), headers=NO_CACHE)
    assert alone.status_code == 400, alone.text
    expected = [httpx.post(url, content=p, headers=NO_CACHE).json()[0]["label"] for p in pngs]
    bodies = [*pngs]
    bodies[5] = corrupt(pngs[5])
    replies = asyncio.run(post_images(url, bodies))
    assert replies[5].status_code == 400
    assert replies[5].json() == alone.json(), "the same error as when it comes alone, in the HF dialect"
    others = [(i, r) for i, r in enumerate(replies) if i != 5]
    assert [r.status_code for _, r in others] == [200] * 23
    assert [r.json()[0]["label"] for _, r in others] == [expected[i] for i, _ in others]

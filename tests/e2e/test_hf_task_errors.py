"""Bad input for every HF task: a clear 4xx in the HF dialect, never a 500, nothing lost."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import orjson
import pytest
from PIL import Image

from services.models.builders import digits
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.xdist_group("mesh")

TC = "/models/meshserve/sentiment-minilm"
ZS = f"/models/{MODEL_ID}/pipeline/zero-shot-classification"
IC = "/models/meshserve/digits-cnn"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and which has (almost) no pixel data: decoding it
    would allocate width*height bytes; it must be refused from the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tiff() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="TIFF")
    return buffer.getvalue()


GOOD_PNG = digits.render_png(digits.split()[2][0])
B64 = base64.b64encode(GOOD_PNG).decode()


def js(**body) -> bytes:
    return orjson.dumps(body)


CASES = [
    # (id, path, body, status)
    ("tc-inputs-number", TC, js(inputs=3), 400),
    ("tc-inputs-empty-list", TC, js(inputs=[]), 400),
    ("tc-unknown-parameter", TC, js(inputs="x", parameters={"topk": 1}), 400),
    ("tc-top-k-zero", TC, js(inputs="x", parameters={"top_k": 0}), 400),
    ("tc-bad-function", TC, js(inputs="x", parameters={"function_to_apply": "relu"}), 400),
    ("tc-too-long-no-truncate", TC, js(inputs="word " * 600, parameters={"truncate": False}), 400),
    ("tc-root-field", TC, js(inputs="x", top_k=1), 400),
    ("zs-no-labels", ZS, js(inputs="x"), 400),
    ("zs-empty-labels", ZS, js(inputs="x", parameters={"candidate_labels": []}), 400),
    ("zs-empty-label-string", ZS, js(inputs="x", parameters={"candidate_labels": " , "}), 400),
    ("zs-blank-label", ZS, js(inputs="x", parameters={"candidate_labels": ["a", " "]}), 400),
    ("zs-duplicate-labels", ZS, js(inputs="x", parameters={"candidate_labels": ["a", "a"]}), 400),
    ("zs-too-many-labels", ZS, js(inputs="x", parameters={"candidate_labels": [f"l{i}" for i in range(65)]}), 400),
    (
        "zs-template-without-slot",
        ZS,
        js(inputs="x", parameters={"candidate_labels": ["a"], "hypothesis_template": "No"}),
        400,
    ),
    ("zs-labels-wrong-type", ZS, js(inputs="x", parameters={"candidate_labels": 5}), 400),
    ("zs-inputs-object", ZS, js(inputs={"text": "x"}, parameters={"candidate_labels": ["a"]}), 400),
    ("ic-corrupt-png", IC, GOOD_PNG[:40], 400),
    ("ic-truncated-png", IC, GOOD_PNG[:70], 400),  # cut inside the pixel data
    ("ic-not-an-image", IC, b"hello, I am text", 415),
    ("ic-tiff-unsupported", IC, tiff(), 415),
    ("ic-decompression-bomb", IC, png_header_only(100_000, 100_000), 413),
    ("ic-over-pixel-limit", IC, png_header_only(5000, 5000), 413),
    ("ic-bad-base64", IC, js(inputs="@@not base64@@"), 400),
    ("ic-url-input", IC, js(inputs="https://example.com/cat.png"), 400),
    ("ic-inputs-number", IC, js(inputs=7), 400),
    ("ic-base64-of-text", IC, js(inputs=base64.b64encode(b"plain text").decode()), 415),
    ("ic-unknown-parameter", IC, js(inputs=B64, parameters={"threshold": 0.5}), 400),
    ("ic-too-many-images", IC, js(inputs=[B64] * 65), 413),
    ("ic-empty-body", IC, b"", 400),
]


@pytest.mark.parametrize(("path", "body", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_task_input_is_a_clear_4xx(mesh, path, body, status):
    reply = httpx.post(mesh.url + path, content=body, timeout=30)
    assert reply.status_code == status, reply.text
    payload = reply.json()
    assert isinstance(payload["error"], str) and payload["error"]
    assert payload["error_type"] == "validation"
    assert "Traceback" not in reply.text and " object at 0x" not in payload["error"]


def test_one_bad_image_in_a_list_names_its_index(mesh):
    reply = httpx.post(mesh.url + IC, json={"inputs": [B64, base64.b64encode(b"GIF89a-broken").decode()]})
    assert reply.status_code == 400 and "inputs[1]" in reply.json()["error"]


def test_mesh_still_serves_after_bad_inputs(mesh):
    reply = httpx.post(mesh.url + IC, content=GOOD_PNG)
    assert reply.status_code == 200 and reply.json()[0]["label"] == str(digits.split()[3][0])
    assert httpx.get(mesh.url + "/readyz").status_code == 200

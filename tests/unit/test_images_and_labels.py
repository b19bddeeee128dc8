"""Image decoding safety and classification post-processing, as pure functions."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from services.common.catalog import ImageSpec
from services.common.errors import ErrorCode, MeshError
from services.common.images import decode, sniff_format
from services.gateway.api.hf_tasks import Dialect
from services.postprocess.core import activate, ranked

SPEC = ImageSpec(width=8, height=8, mode="L", mean=(0.5,), std=(0.5,), max_pixels=1_000_000)


def encoded(fmt: str, size=(16, 16), mode="L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 255).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
def test_every_supported_format_is_sniffed_and_decoded(fmt):
    data = encoded(fmt)
    assert sniff_format(data) == fmt
    pixels = decode(data, SPEC)
    assert pixels.shape == (1, 8, 8) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, 1.0, atol=0.02)  # white -> (1 - 0.5) / 0.5


def test_rgba_is_composited_on_white_for_rgb_models():
    spec = ImageSpec(width=4, height=4, mode="RGB")
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, format="PNG")  # fully transparent black
    np.testing.assert_allclose(decode(buffer.getvalue(), spec), 1.0, atol=1e-6)


def test_over_limit_image_is_refused_from_its_header_without_decoding():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 8, 0, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    tracemalloc.start()
    with pytest.raises(MeshError) as err:
        decode(bomb, SPEC)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert peak < 10 * 1024 * 1024  # decoding would have needed 900 MB


def test_unsupported_and_corrupt_images_have_distinct_errors():
    tiff = encoded("TIFF")
    with pytest.raises(MeshError) as err:
        decode(tiff, SPEC)
    assert err.value.code is ErrorCode.UNSUPPORTED_MEDIA_TYPE
    with pytest.raises(MeshError) as err:
        decode(encoded("PNG")[:50], SPEC)
    assert err.value.code is ErrorCode.INVALID_INPUT


def test_ranked_sorts_best_first_and_cuts_to_top_k():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    items = ranked(scores, ["a", "b", "c"], 2)
    assert [i.labels for i in items] == [["b", "c"], ["a", "c"]]
    assert items[0].scores == pytest.approx([0.7, 0.2])


def test_activations():
    logits = np.array([[2.0, 0.0]])
    assert activate(logits, "softmax").sum() == pytest.approx(1.0)
    assert activate(logits, "sigmoid")[0, 0] == pytest.approx(1 / (1 + np.exp(-2)))
    assert activate(logits, "none") is logits


@pytest.mark.parametrize(
    ("user_agent", "legacy"),
    [
        ("unknown/None; hf_hub/0.36.2; python/3.11.7", True),
        ("unknown/None; hf_hub/1.1.0; python/3.11.7", True),
        ("unknown/None; hf_hub/1.2.0; python/3.11.7", False),
        ("unknown/None; hf_hub/2.4.0; python/3.11.7", False),
        ("curl/8.0", False),
        ("", False),
    ],
)
def test_zero_shot_shape_follows_the_hf_client_version(user_agent, legacy):
    assert Dialect.from_user_agent(user_agent).legacy_zero_shot is legacy

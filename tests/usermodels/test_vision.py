"""Users' image classifiers (ViT, ConvNeXt, ResNet) served from their folders: InferenceClient's
image_classification on PNG and JPEG bytes (one JPEG with an EXIF orientation tag) equals
pipeline("image-classification") on the same folder and file: labels, order, scores within 1e-4."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.xdist_group("usermodels")

VISION = ("test/vit", "test/convnext", "test/resnet")


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _bytes(image: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    if orientation is None:
        image.save(out, fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation  # EXIF Orientation: 6 = turn 90 degrees clockwise to view
        image.save(out, fmt, exif=exif)
    return out.getvalue()


FILES = {
    "png": _bytes(_picture(61, 45, 0), "PNG"),
    "jpeg": _bytes(_picture(40, 72, 1), "JPEG"),
    "jpeg-exif": _bytes(_picture(80, 36, 2), "JPEG", orientation=6),
}


@functools.cache
def _pipeline(folder: Path):
    from transformers import pipeline

    return pipeline("image-classification", model=str(folder), device="cpu")


def expected(folder: Path, data: bytes, tmp_path: Path, **kwargs) -> list[dict]:
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    return _pipeline(folder)(str(path), **kwargs)


def assert_same(got, want: list[dict]) -> None:
    assert [g.label for g in got] == [w["label"] for w in want]
    np.testing.assert_allclose([g.score for g in got], [w["score"] for w in want], atol=1e-4)


@pytest.mark.parametrize("model_id", VISION)
@pytest.mark.parametrize("name", list(FILES))
def test_image_classification_equals_the_pipeline(hf_client, user_folders, model_id, name, tmp_path):
    got = hf_client(model_id).image_classification(FILES[name])
    want = expected(user_folders[model_id], FILES[name], tmp_path)
    assert len(want) == 5  # the pipeline's default top_k
    assert_same(got, want)


@pytest.mark.parametrize("model_id", VISION)
def test_top_k_and_function_to_apply_equal_the_pipeline(hf_client, user_folders, model_id, tmp_path):
    client, data = hf_client(model_id), FILES["jpeg-exif"]
    for top_k, function in ((2, "sigmoid"), (3, "none"), (20, "softmax")):
        got = client.image_classification(data, top_k=top_k, function_to_apply=function)
        assert_same(got, expected(user_folders[model_id], data, tmp_path, top_k=top_k, function_to_apply=function))


def test_the_exif_orientation_is_applied_like_load_image(hf_client, user_folders, tmp_path):
    """The tagged JPEG is classified as its upright picture: the answer differs from the same JPEG
    without the tag (its stored pixels), and equals the pipeline's on the tagged file."""
    image = _picture(80, 36, 2)
    tagged, untagged = FILES["jpeg-exif"], _bytes(image, "JPEG")
    client = hf_client("test/vit")
    on_tagged, on_untagged = client.image_classification(tagged), client.image_classification(untagged)
    assert [g.score for g in on_tagged] != pytest.approx([g.score for g in on_untagged], abs=1e-4)
    assert_same(on_tagged, expected(user_folders["test/vit"], tagged, tmp_path))


def test_a_corrupt_image_is_a_4xx_naming_the_input(hf_client):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as caught:
        hf_client("test/convnext").image_classification(FILES["png"][:80])
    assert 400 <= caught.value.response.status_code < 500
    assert "inputs" in caught.value.response.text

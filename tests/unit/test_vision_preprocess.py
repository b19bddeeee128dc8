"""Users' vision models in process: preprocess's pixels equal the folder's image processor on
transformers' load_image (EXIF orientation included), and runtime + postprocess equal
pipeline("image-classification") on the same folder and file."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.catalog import Catalog
from services.common.errors import MeshError
from services.inference.runtime import load_runtime
from services.models.from_folder import entry_from_folder
from services.postprocess.core import Postprocessor
from services.preprocess.core import Preprocessor
from tests.usermodels.factory import built
from tests.usermodels.folders_vision_lm import FOLDERS

VISION = ("test/vit", "test/convnext", "test/resnet")


def picture(width: int = 53, height: int = 37, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    if orientation is None:
        image.save(out, fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation  # the EXIF Orientation tag
        image.save(out, fmt, exif=exif)
    return out.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Per model id: (folder, entry); one Preprocessor and Postprocessor over all three."""
    folders = {model_id: built(model_id, FOLDERS[model_id]) for model_id in VISION}
    entries = {model_id: entry_from_folder(folder, model_id=model_id) for model_id, folder in folders.items()}
    catalog = Catalog(list(entries.values()))
    store = tmp_path_factory.mktemp("store")
    return {
        "folders": folders,
        "entries": entries,
        "pre": Preprocessor(catalog, store),
        "post": Postprocessor(catalog, store),
    }


def pipeline_of(folder: Path):
    from transformers import pipeline

    return pipeline("image-classification", model=str(folder), device="cpu")


def _pixels(served: dict, model_id: str, data: list[bytes]) -> np.ndarray:
    out = asyncio.run(served["pre"].encode_images(model_id, "image-classification", data, field="inputs"))
    assert out.items == len(data)
    return out.tensors["pixel_values"]


@pytest.mark.parametrize("model_id", VISION)
def test_pixels_equal_the_folder_image_processor_on_load_image(served, model_id, tmp_path):
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    folder, entry = served["folders"][model_id], served["entries"][model_id]
    processor = AutoImageProcessor.from_pretrained(str(folder))
    files = {"png": encoded(picture(), "PNG"), "jpeg": encoded(picture(seed=1), "JPEG", orientation=6)}
    for name, data in files.items():
        path = tmp_path / f"image.{name}"
        path.write_bytes(data)
        expected = processor(images=load_image(str(path)), return_tensors="np")["pixel_values"]
        pixels = _pixels(served, model_id, [data])
        assert pixels.dtype == np.float32 and pixels.shape[1:] == tuple(entry.inference.inputs[0].dims)
        np.testing.assert_allclose(pixels, expected, atol=1e-6)
    both = _pixels(served, model_id, list(files.values()))  # one batch of two
    assert both.shape[0] == 2


def test_exif_orientation_turns_the_image_before_the_processor(served):
    """Orientation 6 (rotate 90 clockwise to view): the served pixels are those of the upright image,
    not of the stored one."""
    image = picture(width=64, height=32)
    upright = image.transpose(Image.Transpose.ROTATE_270)  # what a viewer shows for orientation 6
    tagged = _pixels(served, "test/vit", [encoded(image, "PNG", orientation=6)])
    plain = _pixels(served, "test/vit", [encoded(image, "PNG")])
    turned = _pixels(served, "test/vit", [encoded(upright, "PNG")])
    np.testing.assert_allclose(tagged, turned, atol=1e-6)
    assert not np.allclose(tagged, plain, atol=1e-3)


@pytest.mark.parametrize("model_id", VISION)
def test_runtime_and_postprocess_equal_the_pipeline(served, model_id, tmp_path):
    folder = served["folders"][model_id]
    runtime = load_runtime("vision_classification", folder)
    pipe = pipeline_of(folder)
    data = encoded(picture(seed=2), "JPEG", orientation=6)
    path = tmp_path / "image.jpg"
    path.write_bytes(data)
    pixels = _pixels(served, model_id, [data])
    runtime.validate({"pixel_values": pixels})
    outputs = runtime.execute({"pixel_values": pixels})
    for top_k, function in ((None, None), (2, "sigmoid"), (10, "softmax"), (3, "none")):
        kwargs = {k: v for k, v in (("top_k", top_k), ("function_to_apply", function)) if v is not None}
        expected = pipe(str(path), **kwargs)
        (got,) = served["post"].classify(model_id, outputs, top_k=top_k, activation=function)
        assert got.labels == [e["label"] for e in expected], kwargs
        np.testing.assert_allclose(got.scores, [e["score"] for e in expected], atol=1e-4)


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"not an image", "unsupported_media_type"), (encoded(picture(), "PNG")[:60], "invalid_input")],
)
def test_bad_images_are_refused_naming_the_field(served, data, code):
    with pytest.raises(MeshError) as caught:
        _pixels(served, "test/resnet", [encoded(picture(), "PNG"), data])
    assert caught.value.param == "inputs[1]"
    assert caught.value.code.slug == code


def test_runtime_refuses_pixels_of_the_wrong_shape(served):
    runtime = load_runtime("vision_classification", served["folders"]["test/vit"])
    with pytest.raises(ValueError, match="pixel_values"):
        runtime.validate({"pixel_values": np.zeros((1, 1, 32, 32), dtype=np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        runtime.validate({"pixel_values": np.full((1, 3, 32, 32), np.nan, dtype=np.float32)})

"""Pixels for a user's vision model: the request's bytes decoded safely, turned upright by their
EXIF orientation, then the folder's own image processor (resize, crop, rescale, normalize from
preprocessor_config.json), exactly as transformers' image-classification pipeline prepares them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.common import caps, images
from services.common.catalog import ModelEntry
from services.common.errors import invalid
from services.preprocess.core import Encoded


class VisionPreprocessor:
    """The folder's AutoImageProcessor, loaded once; one [n, C, H, W] FP32 batch per request."""

    def __init__(self, entry: ModelEntry, folder: Path) -> None:
        from transformers import AutoImageProcessor

        self.entry = entry
        self.input_name = entry.inference.inputs[0].name
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError) as exc:
            where = folder / "preprocessor_config.json"
            raise ValueError(f"{entry.id}: cannot load the image processor of {where}: {exc}") from None

    def pixels(self, data: list[bytes], *, field: str) -> np.ndarray:
        """Decoded, oriented images through the image processor: [n, C, H, W] float32."""
        where = (lambda i: field) if len(data) == 1 else (lambda i: f"{field}[{i}]")
        pictures = [images.load_oriented(raw, field=where(i)) for i, raw in enumerate(data)]
        pixels = self.processor(images=pictures, return_tensors="np")["pixel_values"]
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def encode(self, data: list[bytes], *, field: str) -> Encoded:
        if not data:
            raise invalid(f"`{field}` must contain at least one image", param=field)
        caps.check_images(self.entry, data, field=field)  # the count
        images.check_sizes(data, self.entry.preprocess.image, field=field)  # pixels, from the headers alone
        return Encoded({self.input_name: self.pixels(data, field=field)}, 0, len(data), [0] * len(data))

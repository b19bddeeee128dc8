"""Runtime of users' image classifiers: any transformers `*ForImageClassification` folder (ViT,
ConvNeXt, ResNet, ...). Input: `pixel_values` FP32 [batch, C, H, W] from the folder's image
processor (preprocess); output: `logits` FP32 [batch, num_labels]. Activation, labels and top-k
are postprocess's.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from services.inference.runtime import Runtime, torch_device


class VisionClassificationRuntime(Runtime):
    """AutoModelForImageClassification in eval mode, on the GPU when this process sees one."""

    pad_values: ClassVar[dict[str, int | float]] = {"pixel_values": 0.0}

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForImageClassification

        self._torch = torch
        self.device = torch_device()
        self.model = AutoModelForImageClassification.from_pretrained(str(model_dir)).eval().to(self.device)
        self.channels = int(getattr(self.model.config, "num_channels", 3))

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        pixels = inputs["pixel_values"]
        if pixels.ndim != 4 or pixels.shape[1] != self.channels:
            raise ValueError(f"input 'pixel_values' must be [batch, {self.channels}, height, width]")
        if not np.isfinite(pixels).all():
            raise ValueError("input 'pixel_values' holds NaN or infinite values")

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        pixels = np.ascontiguousarray(inputs["pixel_values"], dtype=np.float32)
        with torch.inference_mode():
            pixels = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy()).to(self.device)
            logits = self.model(pixel_values=pixels).logits
            return {"logits": logits.to(torch.float32).cpu().numpy()}

"""Builds `meshserve/digits-cnn`: a small CNN trained on scikit-learn's bundled digits set.

The 1,797 8x8 digits (16 gray levels) are rendered as 8-bit PNG images and read back through the
same decoder and normalization that preprocess uses when serving (services.common.images), so the
network is trained on exactly the tensors it will be served. Deterministic: fixed seeds, one
thread, a stratified split with a fixed random state.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from services.common.catalog import ModelEntry
from services.common.images import decode

COMMON = Path(__file__).resolve().parents[2] / "common"  # the serving code the network is trained for
SEED = 0
EPOCHS = 60
TEST_FRACTION = 0.2


def render_png(digit: np.ndarray) -> bytes:
    """One sklearn digit (8x8, values 0..16, ink high) as a grayscale PNG (ink white)."""
    from PIL import Image

    pixels = np.rint(np.asarray(digit, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): the held-out split the card reports
    (tests and benchmarks use the same function, so they see the same held-out digits)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=TEST_FRACTION, stratify=digits.target, random_state=SEED
    )
    return x_train, y_train, x_test, y_test


def inputs() -> list[Path]:
    """Files whose contents define the build (for the store's cache fingerprint)."""
    return [Path(__file__), COMMON / "nets.py", COMMON / "images.py"]


def _tensors(entry: ModelEntry, images: np.ndarray) -> np.ndarray:
    spec = entry.preprocess.image
    return np.stack([decode(render_png(img), spec) for img in images]).astype(np.float32)


def build(entry: ModelEntry, out: Path, base: Path | None = None, progress=None) -> dict:
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from services.common.nets import DigitsCNN

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = split()
    train = torch.from_numpy(_tensors(entry, x_train))
    test = torch.from_numpy(_tensors(entry, x_test))
    labels_train = torch.from_numpy(y_train.astype(np.int64))
    model = DigitsCNN(len(entry.postprocess.labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    losses = []
    epochs = range(EPOCHS) if progress is None else progress(range(EPOCHS), desc=f"train {entry.id}", unit="epoch")
    for _ in epochs:
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for start in range(0, len(train), 64):
            idx = order[start : start + 64]
            batch = train[idx]
            # Augmentation: shift by up to one pixel, so off-centre digits are still read.
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
            batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
            optimizer.zero_grad()
            loss = loss_fn(model(batch), labels_train[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        schedule.step()
        losses.append(total / len(train))
    model.eval()
    with torch.inference_mode():
        predicted = model(test).argmax(1).numpy()
        train_predicted = model(train).argmax(1).numpy()
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out / "model.safetensors"))
    config = {"architecture": "digits_cnn", "labels": list(entry.postprocess.labels)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {
        "train_examples": len(train),
        "test_examples": len(test),
        "train_accuracy": round(float((train_predicted == y_train).mean()), 4),
        "test_accuracy": round(float((predicted == y_test).mean()), 4),
        "final_train_loss": round(losses[-1], 4),
        "epochs": EPOCHS,
    }


def card(entry: ModelEntry, metrics: dict) -> str:
    image = entry.preprocess.image
    return f"""# {entry.id}

{entry.description.strip()}

- **Task**: image-classification (labels {", ".join(entry.postprocess.labels)})
- **Data**: scikit-learn's bundled `load_digits` (1,797 8x8 handwritten digits, 16 gray levels,
  from the UCI optical digits set). Stratified split, random_state={SEED}:
  {metrics["train_examples"]} train / {metrics["test_examples"]} held out.
- **Training**: `DigitsCNN` (services/common/nets.py, three 3x3 conv layers, ~25k parameters),
  AdamW lr 3e-3, cosine schedule, {metrics["epochs"]} epochs, batch 64, random 1-pixel shifts;
  seeds fixed, one thread: the build is deterministic. Images are rendered to 8-bit PNG and read back
  through the serving decoder, so training sees exactly the served tensors.
- **Metrics**: held-out accuracy **{metrics["test_accuracy"]:.4f}**, train accuracy
  {metrics["train_accuracy"]:.4f}, final train loss {metrics["final_train_loss"]}.
- **Input**: any PNG/JPEG/GIF/WebP/BMP; converted to {image.mode}, resized to {image.width}x{image.height}
  ({image.resample}), scaled to [0, 1], normalized with mean {list(image.mean)} / std {list(image.std)}.
- **Limits**: digits drawn light on a dark background, centred, filling the frame (as in the
  training set); a dark digit on white must be inverted first. Not a general image model.
"""

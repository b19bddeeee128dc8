"""A sentence-transformers folder's modules after the encoder: Pooling (every mode of
sentence-transformers) and Dense layers, read from modules.json and run in torch.

Normalize is not run here: postprocess L2-normalizes when the catalog says so (or the caller asks).
A folder with a module this file does not know is refused at load, naming the module.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from services.common.sentence_config import module_kind, pooling_modes


@dataclass
class Dense:
    """One Dense module: activation(x @ weight.T + bias)."""

    weight: object  # torch.Tensor [out, in]
    bias: object | None
    activation: object  # a torch.nn.Module


@dataclass
class SentenceHead:
    """What runs after the encoder: the encoder's folder, the pooling modes (concatenated in
    order) and the Dense layers (in order)."""

    encoder_dir: Path
    modes: tuple[str, ...] = ("mean",)
    dense: list[Dense] = field(default_factory=list)


def _activation(name: str | None):
    """A torch.nn activation from its dotted class name (sentence-transformers' Dense default: Tanh)."""
    import torch

    if name is None:
        return torch.nn.Tanh()
    module, _, cls = name.rpartition(".")
    if not module.startswith("torch.nn") or not cls:
        raise ValueError(f"Dense activation {name!r} is not supported: only torch.nn activations")
    activation = getattr(importlib.import_module(module), cls, None)
    if not (isinstance(activation, type) and issubclass(activation, torch.nn.Module)):
        raise ValueError(f"Dense activation {name!r} is not a torch.nn module")
    return activation()


def load_dense(path: Path) -> Dense:
    """A Dense module folder: config.json and model.safetensors (or pytorch_model.bin)."""
    import torch

    config = json.loads((path / "config.json").read_text())
    if config.get("use_residual") or config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ValueError(f"Dense module {path.name!r}: residual or non-sentence inputs are not supported")
    if config.get("module_output_name") not in (None, "sentence_embedding"):
        raise ValueError(f"Dense module {path.name!r}: outputs other than the sentence embedding are not supported")
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"))
    else:
        weights = torch.load(str(path / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    weight = weights["linear.weight"].to(torch.float32)
    if tuple(weight.shape) != (config["out_features"], config["in_features"]):
        raise ValueError(f"Dense module {path.name!r}: weight shape {tuple(weight.shape)} does not match its config")
    bias = weights.get("linear.bias") if config.get("bias", True) else None
    return Dense(
        weight, None if bias is None else bias.to(torch.float32), _activation(config.get("activation_function"))
    )


def read_head(model_dir: Path) -> SentenceHead:
    """The folder's modules.json read into a SentenceHead; no modules.json: mean pooling."""
    listing = model_dir / "modules.json"
    if not listing.exists():
        return SentenceHead(model_dir)
    head = SentenceHead(model_dir)
    for module in sorted(json.loads(listing.read_text()), key=lambda m: int(m.get("idx", 0))):
        kind, path = module_kind(module), model_dir / str(module.get("path", ""))
        if kind == "Transformer":
            head.encoder_dir = path
        elif kind == "Pooling":
            head.modes = pooling_modes(json.loads((path / "config.json").read_text()))
        elif kind == "Dense":
            head.dense.append(load_dense(path))
        elif kind != "Normalize":  # postprocess normalizes
            raise ValueError(f"sentence-transformers module {module.get('type')!r} is not supported")
    return head


def encoder_dir(model_dir: Path) -> Path:
    """The folder of the encoder (modules.json's Transformer module; no modules.json: the folder)."""
    listing = model_dir / "modules.json"
    if listing.exists():
        for module in json.loads(listing.read_text()):
            if module_kind(module) == "Transformer":
                return model_dir / str(module.get("path", ""))
    return model_dir


def pool(modes: tuple[str, ...], hidden, mask):
    """sentence-transformers' Pooling over [batch, tokens, dim] with a 0/1 mask padded on either side."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    vectors = []
    for mode in modes:
        if mode == "cls":
            first = mask.to(torch.int).argmax(dim=1)
            vectors.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), first])
        elif mode == "max":
            vectors.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = weights.sum(dim=1).clamp(min=1e-9)
            vectors.append((hidden * weights).sum(dim=1) / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
            positions = positions - mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)  # from the first real token
            weighted = weights * positions
            vectors.append((hidden * weighted).sum(dim=1) / weighted.sum(dim=1).clamp(min=1e-9))
        else:  # lasttoken: the last position the mask keeps
            values, flipped = mask.flip(1).max(1)
            last = torch.where(values == 0, 0, hidden.shape[1] - flipped - 1)
            vectors.append((hidden * weights)[torch.arange(hidden.shape[0], device=hidden.device), last])
    return vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)


def apply_dense(layers: list[Dense], vectors):
    import torch

    for layer in layers:
        vectors = layer.activation(torch.nn.functional.linear(vectors, layer.weight, layer.bias))
    return vectors

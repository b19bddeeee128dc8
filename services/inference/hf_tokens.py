"""The `token_classification` runtime: a transformers *ForTokenClassification folder (NER, part of
speech). Output `logits` FP32 [batch, tokens, num_labels], one row per input token; softmax, labels
and entity grouping are postprocess's. Runs in the embedded server and in Triton's Python backend
alike (services/inference/triton_backend.py loads it through RUNTIMES)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.inference.runtime import Runtime, torch_device

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _tensor(torch, array: np.ndarray, device):
    """A writable int64 tensor on the device (arrays decoded from request bytes are read-only)."""
    array = np.ascontiguousarray(array, dtype=np.int64)
    return torch.from_numpy(array if array.flags.writeable else array.copy()).to(device)


class TokenClassificationRuntime(Runtime):
    """AutoModelForTokenClassification from the folder; inputs input_ids, attention_mask and, when
    the model takes them, token_type_ids. Requests of different lengths share a batch padded with
    the model's own pad id (RoBERTa numbers positions from it); each request gets back logits for
    its own tokens only (`request_outputs`)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForTokenClassification

        self._torch = torch
        self.device = torch_device()
        model = AutoModelForTokenClassification.from_pretrained(str(model_dir))
        self.model = model.eval().to(self.device)
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.type_vocab_size = int(getattr(config, "type_vocab_size", 0) or 0)
        # RoBERTa-style models number positions after the pad id: two fewer usable positions.
        offset = 2 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        self.max_tokens = int(getattr(config, "max_position_embeddings", 0) or 1 << 31) - offset
        pad_id = getattr(config, "pad_token_id", None)
        self.pad_values = {"input_ids": int(pad_id or 0), "attention_mask": 0, "token_type_ids": 0}

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if ids.shape[-1] == 0:
            raise ValueError("input 'input_ids' has no tokens")
        if ids.shape[-1] > self.max_tokens:
            raise ValueError(f"input 'input_ids' has {ids.shape[-1]} tokens; the model takes at most {self.max_tokens}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"input 'input_ids' holds token ids outside [0, {self.vocab_size})")
        if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
            raise ValueError("input 'attention_mask' must match 'input_ids' and hold only 0 and 1")
        types = inputs.get("token_type_ids")
        if types is not None:
            if types.shape != ids.shape:
                raise ValueError("input 'token_type_ids' must match 'input_ids'")
            if types.size and (types.min() < 0 or types.max() >= max(self.type_vocab_size, 1)):
                raise ValueError(f"input 'token_type_ids' holds ids outside [0, {max(self.type_vocab_size, 1)})")

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        feed = {name: _tensor(torch, inputs[name], self.device) for name in INPUTS if name in inputs}
        with torch.inference_mode():
            logits = self.model(**feed).logits
        return {"logits": logits.to(torch.float32).cpu().numpy()}

    def request_outputs(self, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's rows of a batch, cut back from the batch's padded length to its own
        (contiguous: Triton's pb_utils.Tensor and the wire encoders copy it as it lies)."""
        tokens = inputs["input_ids"].shape[1]
        return {name: np.ascontiguousarray(array[:, :tokens]) for name, array in outputs.items()}

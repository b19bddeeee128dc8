"""The base of the transformers encoder runtimes (sequence and token classification, masked LM,
question answering): load the folder with a task's Auto class, check token inputs, feed tensors.
The same classes run in the embedded server and in Triton's Python backend (through RUNTIMES)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.inference.runtime import TORCH_CHUNK_SAVING, Runtime, only_zeros_and_ones, run_in_chunks, torch_device

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EncoderRuntime(Runtime):
    """A transformers encoder with a task head, loaded by `auto_class` from the folder; inputs
    input_ids, attention_mask and, when the catalog sends them, token_type_ids. Batches are padded
    with the model's pad id (RoBERTa numbers positions from it)."""

    auto_class = "AutoModel"
    output_names: tuple[str, ...] = ("logits",)
    per_token = False  # outputs with a token axis, cut back to each request's own length

    def __init__(self, model_dir: Path) -> None:
        import torch
        import transformers

        self._torch = torch
        self.device = torch_device()
        model = getattr(transformers, self.auto_class).from_pretrained(str(model_dir))
        self.model = model.eval().to(self.device)
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.type_vocab_size = int(getattr(config, "type_vocab_size", 0) or 0)
        # RoBERTa-style models number positions after the pad id: two fewer usable positions.
        offset = 2 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        self.max_tokens = int(getattr(config, "max_position_embeddings", 0) or 1 << 31) - offset
        self.pad_values = {"input_ids": int(getattr(config, "pad_token_id", None) or 0), "attention_mask": 0,
                           "token_type_ids": 0}  # fmt: skip

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if ids.ndim != 2 or ids.shape[-1] == 0:
            raise ValueError("input 'input_ids' must be [rows, tokens] with at least one token")
        if ids.shape[-1] > self.max_tokens:
            raise ValueError(f"input 'input_ids' has {ids.shape[-1]} tokens; the model takes at most {self.max_tokens}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"input 'input_ids' holds token ids outside [0, {self.vocab_size})")
        if mask.shape != ids.shape or not only_zeros_and_ones(mask):
            raise ValueError("input 'attention_mask' must match 'input_ids' and hold only 0 and 1")
        types = inputs.get("token_type_ids")
        if types is not None:
            if types.shape != ids.shape:
                raise ValueError("input 'token_type_ids' must match 'input_ids'")
            if types.min() < 0 or types.max() >= max(self.type_vocab_size, 1):
                raise ValueError(f"input 'token_type_ids' holds ids outside [0, {max(self.type_vocab_size, 1)})")

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The head's `output_names` (attributes of the model's output), FP32; a batch of more than
        `chunk_rows` rows in length-sorted chunks when they save padding (runtime.run_in_chunks)."""
        tokens = self.output_names if self.per_token else ()
        return run_in_chunks(self._execute, inputs, self.chunk_rows, tokens, TORCH_CHUNK_SAVING)

    def _execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(**self.feed(inputs))
        return {name: getattr(out, name).to(torch.float32).cpu().numpy() for name in self.output_names}

    def request_outputs(self, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return cut_to_tokens(outputs, inputs) if self.per_token else outputs

    def feed(self, inputs: dict[str, np.ndarray]) -> dict:
        """The model's keyword inputs as int64 tensors on its device."""
        feed = {}
        for name in INPUTS:
            if name in inputs:
                array = np.ascontiguousarray(inputs[name], dtype=np.int64)
                array = array if array.flags.writeable else array.copy()  # decoded request bytes are read-only
                feed[name] = self._torch.from_numpy(array).to(self.device)
        return feed


def cut_to_tokens(outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One request's rows of per-token outputs, cut back from the batch's padded length to its own
    (contiguous: Triton's pb_utils.Tensor and the wire encoders copy it as it lies)."""
    tokens = inputs["input_ids"].shape[1]
    return {name: np.ascontiguousarray(array[:, :tokens]) for name, array in outputs.items()}

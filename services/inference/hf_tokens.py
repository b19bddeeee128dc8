"""The `token_classification` runtime: a transformers *ForTokenClassification folder (NER, part of
speech). Output `logits` FP32 [batch, tokens, num_labels], one row per input token; softmax, labels
and entity grouping are postprocess's. Runs in the embedded server and in Triton's Python backend
alike (services/inference/triton_backend.py loads it through RUNTIMES)."""

from __future__ import annotations

import numpy as np

from services.inference.hf_encoder import EncoderRuntime, cut_to_tokens


class TokenClassificationRuntime(EncoderRuntime):
    """AutoModelForTokenClassification. Requests of different lengths share a batch padded with the
    model's own pad id; each request gets back logits for its own tokens only (`request_outputs`)."""

    auto_class = "AutoModelForTokenClassification"

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            logits = self.model(**self.feed(inputs)).logits
        return {"logits": logits.to(torch.float32).cpu().numpy()}

    def request_outputs(self, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return cut_to_tokens(outputs, inputs)

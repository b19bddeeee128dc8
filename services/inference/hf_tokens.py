"""The `token_classification` runtime: a transformers *ForTokenClassification folder (NER, part of
speech). Output `logits` FP32 [batch, tokens, num_labels], one row per input token; softmax, labels
and entity grouping are postprocess's. Runs in the embedded server and in Triton's Python backend
alike (services/inference/triton_backend.py loads it through RUNTIMES)."""

from __future__ import annotations

from services.inference.hf_encoder import EncoderRuntime


class TokenClassificationRuntime(EncoderRuntime):
    """AutoModelForTokenClassification. Requests of different lengths share a batch padded with the
    model's own pad id; each request gets back logits for its own tokens only (`per_token`)."""

    auto_class = "AutoModelForTokenClassification"
    per_token = True

"""The `sequence_classification` runtime: a transformers *ForSequenceClassification folder (a text
classifier, an NLI model, a cross-encoder reranker). Output `logits` FP32 [batch, num_labels];
activation, labels and ranking are postprocess's. Runs in the embedded server and in Triton's
Python backend alike (services/inference/triton_backend.py loads it through RUNTIMES)."""

from __future__ import annotations

from services.inference.hf_encoder import EncoderRuntime


class SequenceClassificationRuntime(EncoderRuntime):
    """AutoModelForSequenceClassification; token_type_ids carry a text pair's segments."""

    auto_class = "AutoModelForSequenceClassification"

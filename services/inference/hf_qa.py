"""The `question_answering` runtime: a transformers *ForQuestionAnswering folder (extractive QA).
Outputs `start_logits` and `end_logits` FP32 [batch, tokens]: one row per window of question and
context; span decoding is postprocess's. Runs in the embedded server and in Triton's Python backend.
"""

from __future__ import annotations

from services.inference.hf_encoder import EncoderRuntime


class QuestionAnsweringRuntime(EncoderRuntime):
    """AutoModelForQuestionAnswering; each request gets back logits for its own tokens only."""

    auto_class = "AutoModelForQuestionAnswering"
    output_names = ("start_logits", "end_logits")
    per_token = True

"""The `question_answering` runtime: a transformers *ForQuestionAnswering folder (extractive QA).
Outputs `start_logits` and `end_logits` FP32 [batch, tokens]: one row per window of question and
context; span decoding is postprocess's. Runs in the embedded server and in Triton's Python backend.
"""

from __future__ import annotations

import numpy as np

from services.inference.hf_encoder import EncoderRuntime, cut_to_tokens


class QuestionAnsweringRuntime(EncoderRuntime):
    """AutoModelForQuestionAnswering; each request gets back logits for its own tokens only."""

    auto_class = "AutoModelForQuestionAnswering"

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(**self.feed(inputs))
        return {
            "start_logits": out.start_logits.to(torch.float32).cpu().numpy(),
            "end_logits": out.end_logits.to(torch.float32).cpu().numpy(),
        }

    def request_outputs(self, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return cut_to_tokens(outputs, inputs)

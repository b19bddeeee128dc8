"""The `masked_lm` runtime: a transformers *ForMaskedLM folder (BERT, RoBERTa, DistilBERT, ...).
Output `mask_logits` FP32 [batch, masks, vocab]: per row, the logits at its mask tokens in order,
zero rows after the last when a row has fewer masks than the longest. Softmax, top-k, targets and
the decoded tokens are postprocess's. Runs in the embedded server and in Triton's Python backend.

Only the mask positions go through the vocabulary projection (a forward pre-hook on the model's
output embeddings picks them): [batch, tokens, vocab] logits never exist.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from services.inference.hf_encoder import EncoderRuntime


def mask_token_id(folder: Path) -> int:
    """The mask token's id, from the folder's tokenizer files (tokenizer_config.json or
    special_tokens_map.json names it, tokenizer.json numbers it)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            token = json.loads(path.read_text()).get("mask_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
                return int(tokenizer.token_to_id(token))
    raise ValueError(f"{folder}: the tokenizer defines no mask token")


class MaskedLMRuntime(EncoderRuntime):
    """AutoModelForMaskedLM; `mask_logits` at the mask token (read from the folder's tokenizer)."""

    auto_class = "AutoModelForMaskedLM"

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.mask_id = mask_token_id(model_dir)
        self._picks = threading.local()  # each instance thread's mask positions, for the hook
        head = self.model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(self._only_masks)

    def _only_masks(self, module, args):
        """Hand the projection only the hidden states at mask positions ([masks, hidden])."""
        picks = getattr(self._picks, "value", None)
        hidden = args[0] if args else None
        if picks is None or hidden is None or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(picks.shape):
            return None  # a layout this hook does not know: the full logits are picked from below
        return (hidden[picks], *args[1:])

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        feed = self.feed(inputs)
        picks = feed["input_ids"] == self.mask_id
        self._picks.value = picks
        try:
            with torch.inference_mode():
                logits = self.model(**feed).logits
        finally:
            self._picks.value = None
        if logits.dim() == 3:  # the hook did not apply
            logits = logits[picks]
        counts = picks.sum(dim=1)
        rows, width = picks.shape[0], int(counts.max()) if picks.shape[0] else 0
        out = torch.zeros((rows, width, logits.shape[-1]), dtype=torch.float32, device=logits.device)
        slots = picks.cumsum(dim=1) - 1
        out[picks.nonzero(as_tuple=True)[0], slots[picks]] = logits.to(torch.float32)
        return {"mask_logits": out.cpu().numpy()}

    def request_outputs(self, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A request's rows cut to its own most masks per row (the batch's may be more)."""
        width = int((inputs["input_ids"] == self.mask_id).sum(axis=1).max(initial=0))
        return {name: np.ascontiguousarray(array[:, :width]) for name, array in outputs.items()}

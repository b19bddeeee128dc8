"""fill-mask in the HF task API: the request body -> typed inputs and parameters, and the typed
fills -> the JSON of transformers' FillMaskPipeline (what `InferenceClient.fill_mask` parses): per
mask token a list of {score, token, token_str, sequence}, best first; a text with several masks
gets a list per mask; several texts a list per text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshserve.tasks.v1 import tasks_pb2
from pydantic import BaseModel, ConfigDict, Field

from services.common.catalog import ModelEntry
from services.common.errors import invalid
from services.gateway.service.validation import parse

if TYPE_CHECKING:
    from services.gateway.api.hf_tasks import Dialect, HFRequest

UINT32_MAX = 2**32 - 1
MAX_TARGETS = 1024


class FillMaskParameters(BaseModel):
    """fill-mask parameters (HF Inference API)."""

    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(None, ge=1, le=UINT32_MAX, description="Candidates per mask (default 5).")
    targets: list[str] | str | None = Field(
        None,
        max_length=MAX_TARGETS,
        description="Score only these words; one not in the vocabulary counts as its first token.",
    )
    truncate: bool | None = Field(None, description="Cut texts over the token limit (default true); false: 400.")


def parse_fill_mask(entry: ModelEntry, inputs, params: dict, extra: dict) -> HFRequest:
    """The HF body's inputs (a text or a list of texts) and parameters as a typed request."""
    from services.gateway.api.hf_tasks import HFRequest, texts

    if extra:
        raise invalid(f"unknown field(s) {sorted(extra)}: put task parameters under `parameters`")
    p = parse(FillMaskParameters, params, where="parameters")
    targets = [p.targets] if isinstance(p.targets, str) else p.targets
    if targets is not None and not targets:
        raise invalid("At least one target must be provided when passed.", param="parameters.targets")
    values, single = texts(inputs)
    parameters = tasks_pb2.TaskParameters(top_k=p.top_k, targets=targets or [], truncate=p.truncate)
    return HFRequest(tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=values)), parameters, single)


def _fills(fills: tasks_pb2.MaskFills) -> list[dict]:
    return [{"score": f.score, "token": f.token, "token_str": f.token_str, "sequence": f.sequence} for f in fills.fills]


def render_fill_mask(result: tasks_pb2.TaskResult, request: HFRequest, dialect: Dialect):
    # The pipeline's nesting: one mask -> its list; several -> a list per mask; one text (or a list
    # of one) -> that text's answer, several -> a list per text.
    per_text = []
    for item in result.fill_mask.items:
        masks = [_fills(m) for m in item.masks]
        per_text.append(masks[0] if len(masks) == 1 else masks)
    return per_text[0] if len(per_text) == 1 else per_text

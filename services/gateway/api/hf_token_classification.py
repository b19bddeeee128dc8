"""token-classification in the HF task API: the request body -> typed inputs and parameters, and the
typed entities -> the JSON of transformers' pipeline (and what `InferenceClient.token_classification`
parses): per entity {entity, score, index, word, start, end} without aggregation, else
{entity_group, score, word, start, end}; a list for one text, a list of lists for several.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from meshserve.tasks.v1 import tasks_pb2
from pydantic import BaseModel, ConfigDict, Field

from services.common.catalog import ModelEntry
from services.common.errors import invalid
from services.gateway.service.validation import parse

if TYPE_CHECKING:
    from services.gateway.api.hf_tasks import Dialect, HFRequest

AGGREGATION = {
    None: tasks_pb2.AGGREGATION_STRATEGY_UNSPECIFIED,
    "none": tasks_pb2.AGGREGATION_STRATEGY_NONE,
    "simple": tasks_pb2.AGGREGATION_STRATEGY_SIMPLE,
    "first": tasks_pb2.AGGREGATION_STRATEGY_FIRST,
    "average": tasks_pb2.AGGREGATION_STRATEGY_AVERAGE,
    "max": tasks_pb2.AGGREGATION_STRATEGY_MAX,
}
# ignore_labels travels as a repeated field, where "empty" reads as "unset" (the model's default,
# ["O"]): an explicit empty list, which keeps every label, is sent as [""] (no label is "").
KEEP_ALL_LABELS = [""]


class TokenClassificationParameters(BaseModel):
    """token-classification parameters (HF Inference API)."""

    model_config = ConfigDict(extra="forbid")
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] | None = Field(
        None, description="How tokens are grouped into entities (default: the model's, simple here)."
    )
    ignore_labels: list[str] | None = Field(
        None, max_length=1024, description='Labels left out of the result (default ["O"]; [] keeps all).'
    )
    stride: int | None = Field(None, description="Not supported: long texts are truncated to the model's limit.")
    truncate: bool | None = Field(None, description="Cut texts over the token limit (default true); false: 400.")


def parse_token_classification(entry: ModelEntry, inputs, params: dict, extra: dict) -> HFRequest:
    """The HF body's inputs (a text or a list of texts) and parameters as a typed request."""
    from services.gateway.api.hf_tasks import HFRequest, texts

    if extra:
        raise invalid(f"unknown field(s) {sorted(extra)}: put task parameters under `parameters`")
    p = parse(TokenClassificationParameters, params, where="parameters")
    if p.stride is not None:
        raise invalid(
            "`parameters.stride` is not supported: texts longer than the model's limit are truncated "
            "(or refused with `truncate: false`)",
            param="parameters.stride",
        )
    values, single = texts(inputs)
    ignore = p.ignore_labels if p.ignore_labels != [] else KEEP_ALL_LABELS
    parameters = tasks_pb2.TaskParameters(
        aggregation_strategy=AGGREGATION[p.aggregation_strategy], ignore_labels=ignore or [], truncate=p.truncate
    )
    return HFRequest(tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=values)), parameters, single)


def entity_json(e: tasks_pb2.TokenEntity) -> dict:
    """One entity as the pipeline writes it: a token has an index, a group an entity_group."""
    if e.HasField("index"):
        return {"entity": e.entity, "score": e.score, "index": e.index, "word": e.word, "start": e.start, "end": e.end}
    return {"entity_group": e.entity, "score": e.score, "word": e.word, "start": e.start, "end": e.end}


def render_token_classification(result: tasks_pb2.TaskResult, request: HFRequest, dialect: Dialect):
    rendered = [[entity_json(e) for e in item.entities] for item in result.entities.items]
    return rendered[0] if request.single else rendered

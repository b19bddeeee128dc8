"""Request bodies of the REST API (validated with pydantic; also what /docs shows)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from services.common.errors import invalid

# Ranges of the numbers a request may carry, checked where the request is parsed (REST schemas here,
# in generation_schemas and service/admin, the typed gRPC API in grpc_servicer): each number must
# fit the proto field it goes into downstream, and stay within what the product can do; out of
# range is a 400 naming the field, never an overflow deeper in the mesh (a 500, or a broken stream).
UINT32_MAX = 2**32 - 1  # top_k, max_new_tokens, min_new_tokens (uint32 in tasks.proto)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seed: an int64 KServe parameter downstream
MAX_STOP_STRINGS = 16  # stop strings per generation (postprocess refuses more)
MAX_STOP_CHARS = 256  # characters per stop string (each is matched on every token)
MAX_TEMPERATURE = 100.0  # the inference service's sampler refuses more


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class HFOptions(BaseModel):
    """The HF Inference API `options` object: `use_cache` (default true) answers a repeated request from
    the response cache; `wait_for_model` (default false) waits for a cold model instead of a 503.
    Unknown keys are ignored (they are hints)."""

    model_config = ConfigDict(extra="allow")
    use_cache: bool | None = None
    wait_for_model: bool | None = None


class FeatureExtractionParameters(_Body):
    """feature-extraction parameters (the HF client sends them at the body's root)."""

    normalize: bool | None = Field(None, description="L2-normalize (default: the model's setting, true here).")
    truncate: bool | None = Field(None, description="Cut texts over the token limit (default true); false: 400.")
    truncation_direction: Literal["right", "Right"] | None = Field(None, description="Only right truncation.")
    dimensions: int | None = Field(
        None, ge=1, le=UINT32_MAX, description="Keep the first n dimensions, then L2-normalize (Matryoshka)."
    )
    encoding_format: Literal["float"] | None = None
    prompt_name: str | None = Field(None, description="A prompt of the model's, put before each text (e.g. query).")


class SentenceSimilarityParameters(_Body):
    truncate: bool | None = None


class TextClassificationParameters(_Body):
    """text-classification parameters (HF Inference API)."""

    top_k: int | None = Field(None, ge=1, le=UINT32_MAX, description="Only the k best labels (default: all).")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="Activation over the logits (default: the model's, softmax here)."
    )
    truncate: bool | None = Field(None, description="Cut texts over the token limit (default true); false: 400.")


class ZeroShotParameters(_Body):
    """zero-shot-classification parameters (HF Inference API)."""

    candidate_labels: list[str] | str = Field(..., description="Labels to score; a string is split on commas.")
    hypothesis_template: str | None = Field(None, description="Default: the model's (catalog postprocess.zero_shot).")
    multi_label: bool | None = Field(None, description="Score each label on its own (default false).")
    truncate: bool | None = None

    def labels(self) -> list[str]:
        if isinstance(self.candidate_labels, str):
            return [label.strip() for label in self.candidate_labels.split(",") if label.strip()]
        return self.candidate_labels


class ImageClassificationParameters(_Body):
    """image-classification parameters (HF Inference API)."""

    top_k: int | None = Field(None, ge=1, le=UINT32_MAX, description="Only the k best labels (default: 5).")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None


class SentenceSimilarityInputs(_Body):
    source_sentence: str
    sentences: list[str]


class HFTaskRequest(BaseModel):
    """`POST /models/{id}`: the HF task API body."""

    model_config = ConfigDict(extra="allow")
    inputs: str | list[str] | SentenceSimilarityInputs = Field(
        ..., description="Text(s), {source_sentence, sentences}, or base64 image(s); raw image bytes also work."
    )
    parameters: dict | None = None
    options: HFOptions | None = None


# A text with something to embed: preprocess refuses an empty or blank one (`not text.strip()`).
TEXT = {"type": "string", "pattern": "[^\\s\\x1c-\\x1f\\x85\\ufeff]"}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": INT64_MAX}}
# The published schema of `input` says what embed() refuses beyond pydantic: an empty list, an empty
# list of ids, a blank text (the document only; validation is unchanged). The model's own limits
# (texts per request, characters, the vocabulary for token ids) are its card's: GET /v1/models/{id}.
EMBEDDINGS_INPUT = WithJsonSchema(
    {
        "anyOf": [
            TEXT,
            {"type": "array", "minItems": 1, "items": TEXT},
            _TOKEN_IDS,
            {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
        ]
    }
)
# Token ids are used as they are: no prompt before them.
PROMPT_NEEDS_TEXT = {
    "if": {"required": ["input"], "properties": {"input": {"type": "array", "items": {"not": {"type": "string"}}}}},
    "then": {"properties": {"prompt_name": {"type": "null"}}},
}


class EmbeddingsRequest(_Body):
    """`POST /v1/embeddings`: OpenAI's embeddings request."""

    model_config = ConfigDict(json_schema_extra=PROMPT_NEEDS_TEXT)
    model: str = Field(
        ...,
        json_schema_extra={"minLength": 1},
        description="Catalog model id, e.g. sentence-transformers/all-MiniLM-L6-v2.",
    )
    input: Annotated[str | list[str] | list[int] | list[list[int]], EMBEDDINGS_INPUT] = Field(
        ...,
        description="Text, list of texts, or token ids (one list or a list of lists): on /v1 the model's own "
        "tokenizer's ids, as vLLM reads them; on /tiktoken/v1 tiktoken's cl100k_base ids, as OpenAI reads them.",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 (the openai SDK's default)."
    )
    dimensions: int | None = Field(
        None, ge=1, le=UINT32_MAX, description="Keep the first n dimensions, then L2-normalize (Matryoshka)."
    )
    prompt_name: str | None = Field(
        None, description="meshserve extra: a prompt of the model's (e.g. query), put before each text."
    )
    user: str | None = Field(None, description="The caller's end-user id (accepted; not used).")

    @field_validator("input", mode="before")
    @classmethod
    def _token_ids_in_range(cls, value):
        """Token ids fit the int64 they travel as (else one clear error, not every union member's;
        a JSON integer over 64 bits arrives as a float)."""
        if isinstance(value, list) and value and not isinstance(value[0], str):
            rows = value if isinstance(value[0], list) else [value]
            if any(
                isinstance(t, (int, float)) and not 0 <= t <= INT64_MAX
                for row in rows
                if isinstance(row, list)
                for t in row
            ):
                raise ValueError("token ids must be between 0 and 2**63 - 1")
        return value


def check_stops(stops: list[str], param: str = "stop") -> list[str]:
    """Stop strings within the caps: at most MAX_STOP_STRINGS, each of 1 to MAX_STOP_CHARS
    characters (REST and gRPC alike; postprocess would refuse more only after the stream began)."""
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"`{param}` takes at most {MAX_STOP_STRINGS} strings ({len(stops)} given)", param=param)
    if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise invalid(f"`{param}`: each stop string must have 1 to {MAX_STOP_CHARS} characters", param=param)
    return stops


def check_generation_pb(p) -> None:
    """The typed gRPC API's GenerationParameters (tasks.proto): the proto types bound most
    integers already; these are the ranges beyond them (INVALID_ARGUMENT naming the field)."""

    def refuse(name: str, rule: str):
        raise invalid(f"`parameters.{name}` {rule}", param=f"parameters.{name}")

    if p.HasField("seed") and p.seed > INT64_MAX:
        refuse("seed", f"must be at most {INT64_MAX} (2**63 - 1)")
    if p.HasField("temperature") and not 0 <= p.temperature <= MAX_TEMPERATURE:
        refuse("temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
    if p.HasField("top_p") and not 0 < p.top_p <= 1:
        refuse("top_p", "must be in (0, 1]")
    if p.HasField("repetition_penalty") and not 0 < p.repetition_penalty < math.inf:
        refuse("repetition_penalty", "must be a finite number > 0")
    check_stops(list(p.stop), "parameters.stop")

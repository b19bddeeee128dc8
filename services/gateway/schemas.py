"""Request bodies of the REST API (validated with pydantic; also what /docs shows)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import invalid


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    dimensions: int | None = Field(None, description="Must equal the model's dimension if given.")
    encoding_format: Literal["float"] | None = None
    prompt_name: None = Field(None, description="Not supported: the catalog defines no prompts.")


class SentenceSimilarityParameters(_Body):
    truncate: bool | None = None


class TextClassificationParameters(_Body):
    """text-classification parameters (HF Inference API)."""

    top_k: int | None = Field(None, ge=1, description="Only the k best labels (default: all).")
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

    top_k: int | None = Field(None, ge=1, description="Only the k best labels (default: 5).")
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


class EmbeddingsRequest(_Body):
    """`POST /v1/embeddings`: OpenAI's embeddings request."""

    model: str = Field(..., description="Catalog model id, e.g. sentence-transformers/all-MiniLM-L6-v2.")
    input: str | list[str] | list[int] | list[list[int]] = Field(..., description="Text or list of texts.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 (the openai SDK's default)."
    )
    dimensions: int | None = Field(None, description="Must equal the model's dimension if given.")
    user: str | None = None


def parse(model: type[BaseModel], data, *, where: str = ""):
    """Validate data against a model; bad input becomes one clear INVALID_INPUT error."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        field = f"{where}.{loc}" if where and loc else (where or loc)
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            msg = f"unknown parameter (accepted: {allowed})"
        raise invalid(f"`{field}`: {msg}" if field else msg, param=field or None) from None

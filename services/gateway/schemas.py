"""Request bodies of the REST API (validated with pydantic; also what /docs shows)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import invalid


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HFOptions(BaseModel):
    """The HF Inference API `options` object. Accepted; unknown keys are ignored (they are hints)."""

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


class SentenceSimilarityInputs(_Body):
    source_sentence: str
    sentences: list[str]


class HFTaskRequest(BaseModel):
    """`POST /models/{id}`: the HF task API body."""

    model_config = ConfigDict(extra="allow")
    inputs: str | list[str] | SentenceSimilarityInputs
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

"""Request bodies of the generation routes (validated with pydantic; also what /docs shows):
OpenAI chat completions and completions, and the HF/TGI `text_generation` parameters.

Unknown request fields are refused with 400, like OpenAI's own API; known but unsupported
features (n > 1 with best_of, `skip_special_tokens: false`) are refused with a message that says
so. vLLM's sampling extras (what the openai SDK's `extra_body` merges into the body) are accepted
at the top level. `response_format`, `tools` and `tool_choice` are checked by structured.py.

What a route checks beyond pydantic (structured.py, check_supported, check_stops, the cross-field
rules) is said in the JSON schema too (`WithJsonSchema`, `json_schema_extra`: the document only,
validation is unchanged), so that a body the published schema allows is one the server accepts
(tests/e2e/test_api_docs.py fuzzes it). What JSON Schema cannot say (a named `tool_choice` must be
one of `tools`; limits of the model: its context length, vocabulary) is in the descriptions.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, WithJsonSchema

from services.common.errors import invalid
from services.gateway.api.schemas import (
    INT64_MAX,
    INT64_MIN,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    UINT32_MAX,
    check_stops,
)
from services.gateway.service.generate import SamplingExtras

MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit (and vLLM's default)
MAX_LOGIT_BIAS = 300  # OpenAI's limit on `logit_bias` entries
MAX_CHOICES = 16  # most `n` one request may ask for: n sequences share the batch
MAX_STOP_TOKEN_IDS = 64
NULL = {"type": "null"}


def nullable(*schemas: dict) -> WithJsonSchema:
    """The published schema of an optional field: one of `schemas`, or null."""
    return WithJsonSchema({"anyOf": [*schemas, NULL]})


# A JSON schema as `response_format` and tools' `parameters` take it: any valid JSON schema object
# is accepted (checked_schema); the document lists the common keywords, with their types, so that a
# generated example is one (an unknown keyword is ignored by JSON Schema; a known one of the wrong
# type is refused).
_TYPES = {"enum": ["object", "array", "string", "number", "integer", "boolean", "null"]}
_PROPERTY = {
    "type": "object",
    "properties": {"type": _TYPES, "description": {"type": "string"}},
    "additionalProperties": False,
}
JSON_SCHEMA_OBJECT = {
    "type": "object",
    "description": "A JSON schema (draft 2020-12 unless `$schema` says another); the common keywords shown.",
    "properties": {
        "type": _TYPES,
        "description": {"type": "string"},
        "properties": {"type": "object", "additionalProperties": _PROPERTY},
        "required": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    },
    "additionalProperties": False,
}
RESPONSE_FORMAT = nullable(
    {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}},
    {
        "type": "object",
        "required": ["type", "json_schema"],
        "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "schema": JSON_SCHEMA_OBJECT, "strict": {}},
            },
        },
    },
)
TOOLS = nullable(
    {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["function"],
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "description": {"type": "string"},
                        "parameters": {"anyOf": [JSON_SCHEMA_OBJECT, NULL]},
                    },
                },
            },
        },
    }
)
TOOL_CHOICE = nullable(
    {"enum": ["none", "auto", "required"]},
    {
        "type": "object",
        "required": ["function"],
        "description": "A function of `tools` by name.",
        "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        },
    },
)
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
STOP = nullable(_STOP_STRING, {"type": "array", "items": _STOP_STRING, "maxItems": MAX_STOP_STRINGS})
LOGIT_BIAS = nullable(
    {
        "type": "object",
        "maxProperties": MAX_LOGIT_BIAS,
        "propertyNames": {"pattern": "^[0-9]{1,18}$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    }
)
STOP_TOKEN_IDS = nullable(
    {"type": "array", "maxItems": MAX_STOP_TOKEN_IDS, "items": {"type": "integer", "minimum": 0, "maximum": INT64_MAX}}
)
# Tools that may be called (`tools` not empty, `tool_choice` not "none") take one choice.
ONE_CHOICE_WITH_TOOLS = {
    "if": {
        "required": ["tools"],
        "properties": {"tools": {"type": "array", "minItems": 1}, "tool_choice": {"not": {"const": "none"}}},
    },
    "then": {"properties": {"n": {"anyOf": [{"const": 1}, NULL]}}},
}
# `tool_choice` other than none/auto needs tools.
CHOICE_NEEDS_TOOLS = {
    "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": [None, "none", "auto"]}}}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
}


# Chat's `true`, completions' `k`: a JSON boolean is a bool, any number an int (`1.0` is JSON
# Schema's integer 1, which a lax bool would take as true).
Logprobs = Annotated[bool, Strict()] | int | None


class _Open(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(..., json_schema_extra={"const": "text"}, description="Only text parts are supported.")
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are ignored
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self, i: int) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise invalid(f"`messages[{i}].content`: only text parts are supported", param="messages")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None
    # vLLM's: usage (so far) on every chunk, not only on a last chunk of its own.
    continuous_usage_stats: bool | None = None


class SamplingRequest(_Open):
    model: str = Field(
        ...,
        json_schema_extra={"minLength": 1},
        description="Catalog model id (HF clients send `dummy` on a model URL).",
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX, description="At most the model's total-token limit.")
    min_tokens: int | None = Field(
        None, ge=0, le=UINT32_MAX,
        description="vLLM's extension: no end or stop token before this many tokens (fixed-length runs).",
    )  # fmt: skip
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Annotated[str | list[str] | None, STOP] = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Choices, sampled together in the batch.")
    user: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: Logprobs = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: Annotated[dict[str, float] | None, LOGIT_BIAS] = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (a string) -> bias in [-100, 100]."
    )
    # vLLM's extras (the openai SDK's extra_body): top_k -1 is off, as 0.
    top_k: int | None = Field(None, ge=-1, le=UINT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_TEMPERATURE)
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[int] | None, STOP_TOKEN_IDS] = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: Annotated[bool | None, nullable({"const": True})] = Field(
        None, description="Only true: special tokens are never in the text."
    )
    response_format: Annotated[dict | None, RESPONSE_FORMAT] = None
    tools: Annotated[list | None, TOOLS] = None
    tool_choice: Annotated[str | dict | None, TOOL_CHOICE] = None
    tool_prompt: str | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict | None = None
    store: bool | None = None

    def check_supported(self) -> None:
        if self.skip_special_tokens is False:
            raise invalid("`skip_special_tokens: false` is not supported: special tokens are never in the text",
                          param="skip_special_tokens")  # fmt: skip
        if any(not 0 <= t <= INT64_MAX for t in self.stop_token_ids or ()):
            raise invalid("`stop_token_ids` must be token ids (>= 0)", param="stop_token_ids")

    def logit_biases(self) -> dict[int, float] | None:
        """`logit_bias` with integer keys; the inference service checks them against the vocabulary."""
        if not self.logit_bias:
            return None
        biases = {}
        for key, bias in self.logit_bias.items():
            if not (key.isascii() and key.strip().isdigit()) or int(key) > INT64_MAX:
                raise invalid(f"`logit_bias` keys must be token ids; got {key!r}", param="logit_bias")
            if not -100 <= bias <= 100:
                raise invalid(f"`logit_bias[{key}]` must be in [-100, 100]", param="logit_bias")
            biases[int(key)] = bias
        return biases

    def top_alternatives(self) -> int | None:
        """Log-probabilities asked for: None (none), else the alternatives per token (0..20)."""
        raise NotImplementedError

    def extras(self) -> SamplingExtras | None:
        """The OpenAI and vLLM extras for the pipeline; None when none is set."""
        top = self.top_alternatives()
        extras = SamplingExtras(
            min_p=self.min_p or None, ignore_eos=bool(self.ignore_eos),
            frequency_penalty=self.frequency_penalty or None, presence_penalty=self.presence_penalty or None,
            logit_bias=self.logit_biases(), stop_token_ids=tuple(sorted(set(self.stop_token_ids or ()))),
            logprobs=top is not None, top_logprobs=top or 0,
        )  # fmt: skip
        return None if extras == SamplingExtras() else extras

    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def stops(self) -> list[str]:
        return check_stops([self.stop] if isinstance(self.stop, str) else list(self.stop or []))


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions`."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                ONE_CHOICE_WITH_TOOLS,
                CHOICE_NEEDS_TOOLS,
                {  # top_logprobs needs logprobs: true
                    "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
                    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
                },
            ]
        }
    )
    messages: list[ChatMessageIn] = Field(..., min_length=1)
    logprobs: Annotated[Logprobs, nullable({"type": "boolean"})] = None
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)

    def top_alternatives(self) -> int | None:
        """Chat's `logprobs: true` with `top_logprobs` (which needs it, as OpenAI says)."""
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise invalid("`logprobs` must be a boolean on chat completions", param="logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


# `best_of`, when set, equals `n` (1 when `n` is unset).
BEST_OF_IS_N = {
    "anyOf": [
        {"properties": {"best_of": NULL}},
        {"properties": {"best_of": {"const": 1}, "n": {"anyOf": [{"const": 1}, NULL]}}},
        *(
            {"required": ["n"], "properties": {"best_of": {"const": k}, "n": {"const": k}}}
            for k in range(2, MAX_CHOICES + 1)
        ),
    ]
}


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions` (legacy)."""

    model_config = ConfigDict(json_schema_extra=BEST_OF_IS_N)  # tools: chat's (ignored here)
    prompt: Annotated[
        str | list[str],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                ]
            }
        ),
    ] = Field(..., description="One prompt, not empty: a string, or a list of one string.")
    echo: Annotated[bool | None, nullable({"const": False})] = Field(None, description="Not supported: false only.")
    suffix: Annotated[str | None, nullable({"type": "string", "maxLength": 0})] = Field(
        None, description="Not supported: empty only."
    )
    best_of: int | None = Field(None, description="Equal to `n` (every sampled sequence is returned).")
    logprobs: Annotated[
        Logprobs, nullable({"const": False}, {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS})
    ] = Field(None, description=f"Alternatives per token, 0 to {MAX_TOP_LOGPROBS}.")
    top_logprobs: Annotated[int | None, WithJsonSchema(NULL)] = Field(
        None, description="Chat's; completions take `logprobs: k`."
    )

    def top_alternatives(self) -> int | None:
        """Completions' `logprobs: k` (0..20; OpenAI allows 5, vLLM 20)."""
        if self.top_logprobs is not None:
            raise invalid("`top_logprobs` is chat's; completions take `logprobs: k`", param="top_logprobs")
        if self.logprobs is None or self.logprobs is False:
            return None
        if isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise invalid(f"`logprobs` must be an integer in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
        return self.logprobs


class TGIParameters(_Open):
    """The TGI `parameters` object (what huggingface_hub's text_generation sends)."""

    max_new_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=UINT32_MAX)
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: list[str] | None = None
    details: bool | None = None
    do_sample: bool | None = None
    return_full_text: bool | None = None
    truncate: int | None = None
    watermark: bool | None = None
    decoder_input_details: bool | None = None
    best_of: int | None = None
    typical_p: float | None = None
    top_n_tokens: int | None = None
    frequency_penalty: float | None = None
    grammar: dict | None = None
    adapter_id: str | None = None

    def check_supported(self) -> None:
        unsupported = {
            "watermark": self.watermark,
            "best_of": (self.best_of or 1) > 1,
            "typical_p": self.typical_p is not None and self.typical_p < 1,
            "top_n_tokens": self.top_n_tokens,
            "frequency_penalty": self.frequency_penalty,
            "grammar": self.grammar,
            "adapter_id": self.adapter_id,
            "truncate": self.truncate is not None,
        }
        for name, used in unsupported.items():
            if used:
                raise invalid(f"`parameters.{name}` is not supported", param=f"parameters.{name}")

"""Request bodies of the generation routes (validated with pydantic; also what /docs shows):
OpenAI chat completions and completions, and the HF/TGI `text_generation` parameters.

Unknown request fields are refused with 400, like OpenAI's own API; known but unsupported
features (n > 1, logprobs) are refused with a message that says so. `response_format`, `tools`
and `tool_choice` are checked by structured.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import invalid
from services.gateway.api.schemas import INT64_MAX, INT64_MIN, MAX_TEMPERATURE, UINT32_MAX, check_stops


class _Open(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
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


class SamplingRequest(_Open):
    model: str = Field(..., description="Catalog model id (HF clients send `dummy` on a model URL).")
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
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    tool_prompt: str | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict | None = None
    store: bool | None = None

    def check_supported(self) -> None:
        if (self.n or 1) != 1:
            raise invalid("`n` must be 1: one choice per request", param="n")
        if self.logprobs or self.top_logprobs:
            raise invalid(
                "`logprobs` is not supported on this route (the TGI route returns token logprobs)", param="logprobs"
            )
        if self.logit_bias:
            raise invalid("`logit_bias` is not supported", param="logit_bias")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise invalid(f"`{name}` is not supported (the TGI route takes `repetition_penalty`)", param=name)

    def stops(self) -> list[str]:
        return check_stops([self.stop] if isinstance(self.stop, str) else list(self.stop or []))


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessageIn] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions` (legacy)."""

    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


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

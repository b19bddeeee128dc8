"""Request bodies of the generation routes (validated with pydantic; also what /docs shows):
OpenAI chat completions and completions, and the HF/TGI `text_generation` parameters.

Unknown request fields are refused with 400, like OpenAI's own API; known but unsupported
features (n > 1 with best_of, `skip_special_tokens: false`) are refused with a message that says
so. vLLM's sampling extras (what the openai SDK's `extra_body` merges into the body) are accepted
at the top level. `response_format`, `tools` and `tool_choice` are checked by structured.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import invalid
from services.gateway.api.schemas import INT64_MAX, INT64_MIN, MAX_TEMPERATURE, UINT32_MAX, check_stops
from services.gateway.service.generate import SamplingExtras

MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit (and vLLM's default)
MAX_LOGIT_BIAS = 300  # OpenAI's limit on `logit_bias` entries


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
    # vLLM's: usage (so far) on every chunk, not only on a last chunk of its own.
    continuous_usage_stats: bool | None = None


MAX_CHOICES = 16  # most `n` one request may ask for: n sequences share the batch
MAX_STOP_TOKEN_IDS = 64


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
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Choices, sampled together in the batch.")
    user: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (a string) -> bias in [-100, 100]."
    )
    # vLLM's extras (the openai SDK's extra_body): top_k -1 is off, as 0.
    top_k: int | None = Field(None, ge=-1, le=UINT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_TEMPERATURE)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
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

    messages: list[ChatMessageIn] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)

    def top_alternatives(self) -> int | None:
        """Chat's `logprobs: true` with `top_logprobs` (which needs it, as OpenAI says)."""
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise invalid("`logprobs` must be a boolean on chat completions", param="logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions` (legacy)."""

    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

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

"""Generation routes: OpenAI chat completions and completions (stream or not), the HF/TGI
`text_generation` dialect on `POST /models/{id}`, all over `Generator`.

SSE exactly as the clients parse it (client-contract §0, §2.2, §2.3, §3.3): one `data: <json>`
line per event, a blank line after each, `data: [DONE]` with the space at the end of OpenAI
streams; a failure after the first byte is an `error` event, never a broken connection. Unknown
request fields are refused with 400, like OpenAI's own API; known but unsupported features
(n > 1, tools, logprobs, JSON modes) are refused with a message that says so.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from services.common.catalog import GENERATION_TASKS, ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.gateway.api.schemas import (
    INT64_MAX,
    INT64_MIN,
    MAX_TEMPERATURE,
    UINT32_MAX,
    check_stops,
    parse,
)
from services.gateway.pipeline.generation import GenerationRequest, Generator, Step

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Open(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are ignored
    role: Literal["system", "user", "assistant", "developer"]
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


class _Sampling(_Open):
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
        if self.tools or self.tool_choice not in (None, "none"):
            raise invalid("tools are not supported by this model", param="tools")
        if self.logprobs or self.top_logprobs:
            raise invalid(
                "`logprobs` is not supported on this route (the TGI route returns token logprobs)", param="logprobs"
            )
        if self.logit_bias:
            raise invalid("`logit_bias` is not supported", param="logit_bias")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise invalid("only `response_format: {type: text}` is supported", param="response_format")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise invalid(f"`{name}` is not supported (the TGI route takes `repetition_penalty`)", param=name)

    def stops(self) -> list[str]:
        return check_stops([self.stop] if isinstance(self.stop, str) else list(self.stop or []))


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessageIn] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)


class CompletionRequest(_Sampling):
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


def sse(event) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def error_event(err: MeshError) -> bytes:
    """A mid-stream failure of an OpenAI-dialect stream (chat, completions): OpenAI's error object,
    which the openai SDK raises as APIError, plus `error_type`, from which huggingface_hub's chat
    client raises its typed error (client-contract §5)."""
    error = {"message": err.message, "type": err.code.openai_type, "code": err.code.slug, "param": err.param}
    return sse({"error": error, "error_type": err.code.hf_type})


def tgi_error_event(err: MeshError) -> bytes:
    """A mid-stream failure of a TGI stream: TGI's own `{"error": str, "error_type": str}` event,
    which huggingface_hub's text_generation raises as a typed error."""
    return sse({"error": err.message, "error_type": err.code.hf_type})


def register(app: FastAPI, catalog, generator: Generator, admit, metering, read_json, json_response) -> dict:
    """Add the OpenAI generation routes; returns the handlers the HF model route dispatches to
    (`chat` for `/models/{id}/v1/chat/completions`, `text_generation` for the TGI dialect).
    `admit(request, entry, task, max_input_tokens, max_output_tokens, tokens_hint)` admits a request
    (the key's model and task restrictions, limits, budget reservation) before its prompt is
    rendered or tokenized; `metering.track` settles it."""

    def generation_entry(model_id: str) -> ModelEntry:
        entry = catalog.get(model_id)
        if not GENERATION_TASKS & set(entry.tasks):
            raise MeshError(
                ErrorCode.UNSUPPORTED_TASK,
                f"Model {entry.id!r} does not generate text; it serves: {', '.join(entry.tasks)}",
                param="model",
            )
        return entry

    async def start(request: Request, entry: ModelEntry, gen: GenerationRequest):
        # Admitted (key, limits, budget hold from the declared bounds) before the prompt is tokenized.
        return await generator.start(
            entry, gen, lambda **bounds: admit(request, entry, "text-generation", **bounds), metering
        )

    async def steps(entry, prepared, gen, metered) -> AsyncIterator[Step]:
        """Generator steps, recording completion tokens and time on the metered request (the time
        however the generation ends: a closed or failed stream pays for what it ran)."""
        started = time.perf_counter()
        try:
            async with aclosing(generator.stream(entry, prepared, gen)) as stream:
                async for step in stream:
                    if not step.final:
                        metered.add(output_tokens=1)
                    yield step
        finally:
            metered.compute_s = time.perf_counter() - started

    def streaming(body_events, metered, source, on_error) -> StreamingResponse:
        """SSE response whose body settles the metered request when it ends, however it ends.
        Every generator of the chain is closed explicitly (a client that left must stop the
        generation now, not when the garbage collector finalizes a suspended generator). A failure
        after the 200 went out ends the stream with `on_error(err)`'s event and then a clean end of
        the body, never a cut connection; the cause goes to the log."""

        async def body():
            async with metering.track(metered), aclosing(source), aclosing(body_events) as events:
                try:
                    async for chunk in events:
                        yield chunk
                except MeshError as err:
                    log.warning("stream of request %s failed mid-way: %s: %s", metered.request_id, err.code.slug,
                                err.message)  # fmt: skip
                    yield on_error(err)
                    raise
                except Exception as exc:  # a bug: the caller gets a generic error, the log the traceback
                    log.exception("stream of request %s failed mid-way", metered.request_id)
                    err = MeshError(ErrorCode.INTERNAL, "internal error")
                    yield on_error(err)
                    raise err from exc

        return ClosingStreamingResponse(
            _swallow(body()), media_type="text/event-stream", headers={**SSE_HEADERS, **metered.rate_headers()}
        )

    async def respond(
        request: Request, entry: ModelEntry, gen: GenerationRequest, stream: bool, events, render,
        on_error=error_event,
    ):  # fmt: skip
        """Admit and run one generation: an SSE stream of `events(steps, prepared)` (a failure
        mid-way: `on_error(err)`'s event), or one JSON body `render(text, last, tokens)` (`tokens`:
        the steps' TGI token objects)."""
        prepared, metered = await start(request, entry, gen)
        if stream:
            source = steps(entry, prepared, gen, metered)
            return streaming(events(source, prepared), metered, source, on_error)
        async with metering.track(metered):
            text, last, tokens = await _collect(steps(entry, prepared, gen, metered))
        return json_response(render(text, last, tokens), headers=metered.headers())

    def sampling(body: _Sampling, **what) -> GenerationRequest:
        """The OpenAI routes' sampling fields; `what`: the messages or prompt and max_new_tokens."""
        return GenerationRequest(
            min_new_tokens=body.min_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
            stop=body.stops(), **what,
        )  # fmt: skip

    # -- OpenAI chat ----------------------------------------------------------------------------
    async def chat(request: Request, model_id: str | None):
        body = parse(ChatCompletionRequest, await read_json(request, 8 * 1024 * 1024))
        body.check_supported()
        entry = generation_entry(model_id or body.model)
        request.state.model = entry.id
        messages = [(m.role if m.role != "developer" else "system", m.text(i)) for i, m in enumerate(body.messages)]
        gen = sampling(body, messages=messages, max_new_tokens=body.max_completion_tokens or body.max_tokens)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.id,
            "system_fingerprint": "meshserve",
        }  # fmt: skip
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def render(text: str, last: Step, _tokens) -> dict:
            message = {"role": "assistant", "content": text, "refusal": None}
            return {
                **head,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(last),
            }

        return await respond(
            request, entry, gen, bool(body.stream), lambda source, _: _chat_events(source, head, include_usage), render
        )

    @app.post("/v1/chat/completions", tags=["openai"], summary="Chat completions (OpenAI), stream or not")
    async def chat_completions(request: Request):
        return await chat(request, None)

    @app.post("/v1/completions", tags=["openai"], summary="Completions (OpenAI legacy), stream or not")
    async def completions(request: Request):
        body = parse(CompletionRequest, await read_json(request, 8 * 1024 * 1024))
        body.check_supported()
        if body.echo or body.suffix or (body.best_of or 1) > 1:
            raise invalid("`echo`, `suffix` and `best_of` are not supported", param="echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise invalid("`prompt` must be one string (one completion per request)", param="prompt")
        entry = generation_entry(body.model)
        request.state.model = entry.id
        gen = sampling(body, prompt=prompts[0], max_new_tokens=body.max_tokens or 16)  # OpenAI's default: 16
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.id}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def render(text: str, last: Step, _tokens) -> dict:
            return {
                **head,
                "object": "text_completion",
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(last),
            }

        return await respond(
            request, entry, gen, bool(body.stream), lambda source, _: _completion_events(source, head, include_usage),
            render,
        )  # fmt: skip

    # -- HF / TGI text_generation ---------------------------------------------------------------
    async def text_generation(request: Request, entry: ModelEntry, body: dict):
        extra = set(body) - {"inputs", "parameters", "stream", "options"}
        if extra:
            raise invalid(f"unknown field(s) {sorted(extra)}: put task parameters under `parameters`")
        if not isinstance(body.get("inputs"), str) or not body["inputs"]:
            raise invalid("`inputs` must be a non-empty string (the prompt)", param="inputs")
        p = parse(TGIParameters, body.get("parameters") or {}, where="parameters")
        p.check_supported()
        if p.decoder_input_details and body.get("stream"):  # as TGI: the prefill is in the final details only
            raise invalid(
                "`parameters.decoder_input_details` is not supported when streaming tokens",
                param="parameters.decoder_input_details",
            )
        sample = p.do_sample or any(v is not None for v in (p.temperature, p.top_p, p.top_k))
        gen = GenerationRequest(
            prompt=body["inputs"],
            max_new_tokens=p.max_new_tokens,
            temperature=(p.temperature if p.temperature is not None else 1.0) if sample else 0.0,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            stop=check_stops(p.stop or [], "parameters.stop"),
            prompt_logprobs=bool(p.details and p.decoder_input_details),
        )
        prefix = body["inputs"] if p.return_full_text else ""

        def render(text: str, last: Step, tokens: list[dict]) -> list[dict]:
            result = {"generated_text": prefix + text}
            if p.details:
                result["details"] = {
                    "finish_reason": _tgi_reason(last.finish_reason),
                    "generated_tokens": last.completion_tokens,
                    "seed": p.seed,
                    "prefill": [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in last.prefill],
                    "tokens": tokens,
                }
            return [result]

        return await respond(
            request, entry, gen, bool(body.get("stream")),
            lambda source, prepared: _tgi_events(source, prefix, p.seed, prepared.prompt_tokens), render,
            tgi_error_event,
        )  # fmt: skip

    return {"chat": chat, "text_generation": text_generation}


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator however the response ends (Starlette
    stops iterating on a disconnect but leaves the generator suspended)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _swallow(body):
    """End the SSE body quietly after an error event was sent (the status line is long gone)."""
    try:
        async with aclosing(body) as chunks:
            async for chunk in chunks:
                yield chunk
    except MeshError:
        return


async def _collect(steps) -> tuple[str, Step, list[dict]]:
    """The whole text, the final step, and each token as TGI's details list it."""
    text, last, tokens = "", None, []
    async for step in steps:
        text += step.text
        if step.final:
            last = step
        else:
            tokens.append(_tgi_token(step))
    return text, last, tokens


def _usage(last: Step) -> dict:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }


async def _chat_events(steps, head: dict, include_usage: bool):
    chunk = {**head, "object": "chat.completion.chunk"}
    yield sse(
        {
            **chunk,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
    )
    async for step in steps:
        if step.text:
            yield sse(
                {
                    **chunk,
                    "choices": [{"index": 0, "delta": {"content": step.text}, "logprobs": None, "finish_reason": None}],
                }
            )
        if step.final:
            yield sse(
                {**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": step.finish_reason}]}
            )
            if include_usage:
                yield sse({**chunk, "choices": [], "usage": _usage(step)})
    yield DONE


async def _completion_events(steps, head: dict, include_usage: bool):
    chunk = {**head, "object": "text_completion"}
    async for step in steps:
        if step.text or step.final:
            reason = step.finish_reason if step.final else None
            yield sse(
                {**chunk, "choices": [{"index": 0, "text": step.text, "logprobs": None, "finish_reason": reason}]}
            )
        if step.final and include_usage:
            yield sse({**chunk, "choices": [], "usage": _usage(step)})
    yield DONE


def _tgi_token(step: Step) -> dict:
    return {"id": step.token_id, "text": step.token_text, "logprob": step.logprob, "special": False}


def _tgi_reason(reason: str | None) -> str:
    return {"stop": "eos_token", "length": "length"}.get(reason or "", reason or "eos_token")


async def _tgi_events(steps, prefix: str, seed, input_length: int):
    """TGI stream: every event carries a `token`; the last one also `generated_text` and
    `details`. One step of lookahead puts the final text on the last token's event."""
    pending, text, index = None, "", 0
    async for step in steps:
        text += step.text
        if step.final:
            index += 1
            token = _tgi_token(pending) if pending else {"id": 0, "text": "", "logprob": 0.0, "special": True}
            details = {
                "finish_reason": _tgi_reason(step.finish_reason),
                "generated_tokens": step.completion_tokens,
                "seed": seed,
                "input_length": input_length,
            }
            yield sse({"index": index, "token": token, "generated_text": prefix + text, "details": details})
            return
        if pending is not None:
            index += 1
            yield sse({"index": index, "token": _tgi_token(pending), "generated_text": None, "details": None})
        pending = step

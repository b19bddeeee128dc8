"""Server-sent events exactly as the clients parse them (client-contract §0, §2.2, §2.3, §3.3):
one `data: <json>` line per event and a blank line after it, `data: [DONE]` at the end of OpenAI
streams, and the event a stream ends with when it fails mid-way. Renders OpenAI chat, OpenAI
completion and TGI streams from the service layer's generation Steps."""

from __future__ import annotations

import orjson

from services.common.errors import MeshError
from services.gateway.service.generate import Step

DONE = b"data: [DONE]\n\n"


def sse(event) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


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


def usage(last: Step) -> dict:
    """OpenAI's usage object from the final step."""
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }


async def chat_events(steps, head: dict, include_usage: bool):
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
        text = b""
        if step.text:
            text = sse(
                {
                    **chunk,
                    "choices": [{"index": 0, "delta": {"content": step.text}, "logprobs": None, "finish_reason": None}],
                }
            )
        if step.final:  # the last events in one write
            done = {
                **chunk,
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": step.finish_reason}],
            }
            usage_event = sse({**chunk, "choices": [], "usage": usage(step)}) if include_usage else b""
            yield text + sse(done) + usage_event + DONE
            return
        if text:
            yield text
    yield DONE


async def completion_events(steps, head: dict, include_usage: bool):
    chunk = {**head, "object": "text_completion"}
    async for step in steps:
        if step.final:  # the last events in one write
            reason = step.finish_reason
            text = sse(
                {**chunk, "choices": [{"index": 0, "text": step.text, "logprobs": None, "finish_reason": reason}]}
            )
            usage_event = sse({**chunk, "choices": [], "usage": usage(step)}) if include_usage else b""
            yield text + usage_event + DONE
            return
        if step.text:
            yield sse({**chunk, "choices": [{"index": 0, "text": step.text, "logprobs": None, "finish_reason": None}]})
    yield DONE


def tgi_token(step: Step) -> dict:
    return {"id": step.token_id, "text": step.token_text, "logprob": step.logprob, "special": False}


def tgi_reason(reason: str | None) -> str:
    return {"stop": "eos_token", "length": "length"}.get(reason or "", reason or "eos_token")


async def tgi_events(steps, prefix: str, seed, input_length: int):
    """TGI stream: every event carries a `token`; the last one also `generated_text` and
    `details`. One step of lookahead puts the final text on the last token's event. The events of
    the steps that came together (`Step.more`) go out in one write."""
    pending, text, index, ready = None, "", 0, []
    try:
        async for step in steps:
            text += step.text
            if step.final:
                index += 1
                token = tgi_token(pending) if pending else {"id": 0, "text": "", "logprob": 0.0, "special": True}
                details = {
                    "finish_reason": tgi_reason(step.finish_reason),
                    "generated_tokens": step.completion_tokens,
                    "seed": seed,
                    "input_length": input_length,
                }
                ready.append(sse({"index": index, "token": token, "generated_text": prefix + text, "details": details}))
                yield b"".join(ready)
                return
            if pending is not None:
                index += 1
                ready.append(
                    sse({"index": index, "token": tgi_token(pending), "generated_text": None, "details": None})
                )
            pending = step
            if ready and not step.more:
                yield b"".join(ready)
                ready.clear()
    except Exception:
        # A failure mid-way: the held-back token was generated (and metered): the client gets it
        # before the error event, as a plain token event.
        if pending is not None:
            ready.append(
                sse({"index": index + 1, "token": tgi_token(pending), "generated_text": None, "details": None})
            )
        if ready:
            yield b"".join(ready)
        raise

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


def _logprob(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(steps) -> dict:
    """A chat choice's `logprobs` (ChatCompletionTokenLogprob per token: the token's text and
    UTF-8 bytes, its raw log-probability, its most likely alternatives best first)."""
    content = [
        {**_logprob(s.token_text, s.logprob), "top_logprobs": [_logprob(t.text, t.logprob) for t in s.top]}
        for s in steps
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(steps, offset: int = 0) -> dict:
    """A completion choice's `logprobs` (the legacy shape): per token its text, raw log-probability,
    alternatives (text -> logprob, the chosen token among them, as vLLM) and its offset in the
    completion's text (`offset`: the text before these tokens)."""
    offsets = []
    for step in steps:
        offsets.append(offset)
        offset += len(step.token_text)
    return {
        "tokens": [s.token_text for s in steps],
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": [{**{t.text: t.logprob for t in s.top}, s.token_text: s.logprob} for s in steps],
        "text_offset": offsets,
    }


class _Chunks:
    """What a stream's chunks share: the head, usage so far (vLLM's continuous_usage_stats: on
    every chunk), and per choice the tokens whose logprobs have not gone out yet."""

    def __init__(self, chunk: dict, prompt_tokens: int, continuous: bool, logprobs: bool) -> None:
        self.chunk, self.prompt_tokens, self.continuous, self.logprobs = chunk, prompt_tokens, continuous, logprobs
        self.completion: dict[int, int] = {}
        self.pending: dict[int, list[Step]] = {}
        self.text_offset: dict[int, int] = {}

    def add(self, step: Step) -> None:
        """Count a step (a token unless final) and hold its logprobs until its text goes out."""
        if not step.final:
            self.completion[step.index] = self.completion.get(step.index, 0) + 1
            if self.logprobs:
                self.pending.setdefault(step.index, []).append(step)

    def taken(self, index: int) -> list[Step]:
        return self.pending.pop(index, [])

    def event(self, choice: dict, index: int) -> bytes:
        event = {**self.chunk, "choices": [choice]}
        if self.continuous:
            done = self.completion.get(index, 0)
            event["usage"] = {
                "prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done,
            }  # fmt: skip
        return sse(event)


def _usage_event(chunk: dict, finals: list[Step]) -> bytes:
    """The last chunk of `stream_options.include_usage`: the prompt once, every choice's tokens."""
    completion = sum(f.completion_tokens for f in finals)
    prompt = finals[0].prompt_tokens if finals else 0
    return sse({**chunk, "choices": [], "usage": {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
    }})  # fmt: skip


async def chat_events(steps, head: dict, include_usage: bool, *, n: int = 1, logprobs: bool = False,
                      continuous: bool = False, prompt_tokens: int = 0):  # fmt: skip
    """A chat stream: a role chunk per choice, a content chunk per text, a finish chunk per choice
    (the n choices' chunks interleave, told apart by `index`), then usage and [DONE]. `continuous`
    (with include_usage, as vLLM): usage on every chunk."""
    chunk = {**head, "object": "chat.completion.chunk"}
    state = _Chunks(chunk, prompt_tokens, continuous and include_usage, logprobs)
    role = {"role": "assistant", "content": ""}
    yield b"".join(
        state.event({"index": i, "delta": role, "logprobs": None, "finish_reason": None}, i) for i in range(n)
    )
    finals: list[Step] = []
    async for step in steps:
        state.add(step)
        i, out = step.index, b""
        if step.text:
            lp = chat_logprobs(state.taken(i)) if logprobs else None
            out = state.event({"index": i, "delta": {"content": step.text}, "logprobs": lp, "finish_reason": None}, i)
        if step.final:
            finals.append(step)
            lp = chat_logprobs(state.taken(i)) if logprobs and state.pending.get(i) else None
            out += state.event({"index": i, "delta": {}, "logprobs": lp, "finish_reason": step.finish_reason}, i)
            if len(finals) == n:  # the last events in one write
                yield out + (_usage_event(chunk, finals) if include_usage else b"") + DONE
                return
        if out:
            yield out
    yield DONE


async def completion_events(steps, head: dict, include_usage: bool, *, n: int = 1, logprobs: bool = False,
                            continuous: bool = False, prompt_tokens: int = 0):  # fmt: skip
    """A completion stream: a chunk per text (the last one with the finish reason) per choice, then
    usage and [DONE]; `logprobs`: each chunk carries its tokens' (those without text of their own
    go with the next chunk)."""
    chunk = {**head, "object": "text_completion"}
    state = _Chunks(chunk, prompt_tokens, continuous and include_usage, logprobs)
    finals: list[Step] = []
    async for step in steps:
        state.add(step)
        i = step.index
        if not (step.text or step.final):
            continue
        lp = None
        if logprobs:
            taken = state.taken(i)
            lp = completion_logprobs(taken, state.text_offset.get(i, 0))
            state.text_offset[i] = state.text_offset.get(i, 0) + sum(len(s.token_text) for s in taken)
        out = state.event({"index": i, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason}, i)
        if step.final:
            finals.append(step)
            if len(finals) == n:  # the last events in one write
                yield out + (_usage_event(chunk, finals) if include_usage else b"") + DONE
                return
        yield out
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

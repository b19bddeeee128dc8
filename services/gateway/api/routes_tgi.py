"""The HF/TGI `text_generation` dialect on `POST /models/{id}` (routes_hf dispatches a generation
model's requests here): `{"inputs": prompt, "parameters", "stream"}`, answered as TGI answers,
one `[{generated_text, details}]` body or TGI's token events."""

from __future__ import annotations

from fastapi import Request

from services.common.errors import invalid
from services.gateway.api import routed
from services.gateway.api.generation_responses import respond
from services.gateway.api.generation_schemas import TGIParameters
from services.gateway.api.schemas import check_stops
from services.gateway.api.sse import tgi_error_event, tgi_events, tgi_reason, tgi_token
from services.gateway.service.context import CallContext
from services.gateway.service.generate import Collected, GenerationRequest
from services.gateway.service.validation import parse


def generation_request(body: dict) -> tuple[GenerationRequest, TGIParameters]:
    """The body checked (400 naming what is wrong or unsupported) as the service's request."""
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
    return gen, p


async def text_generation(request: Request, ctx: CallContext, route, body: dict):
    """A generation model's HF/TGI request on the route's model (local or routed)."""
    gen, p = generation_request(body)
    prefix = body["inputs"] if p.return_full_text else ""

    def render(done: Collected) -> list[dict]:
        result = {"generated_text": prefix + done.text}
        if p.details:
            last = done.last
            result["details"] = {
                "finish_reason": tgi_reason(last.finish_reason),
                "generated_tokens": last.completion_tokens,
                "seed": p.seed,
                "prefill": [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in last.prefill],
                "tokens": [tgi_token(step) for step in done.tokens],
            }
        return [result]

    stream = bool(body.get("stream"))
    generation, extra = await routed.start_generation(request, ctx, route, gen, "completion", stream)
    prompt_tokens = generation.prepared.prompt_tokens
    return await respond(
        generation, stream, lambda steps: tgi_events(steps, prefix, p.seed, prompt_tokens), render,
        tgi_error_event, extra=extra,
    )  # fmt: skip

"""Streaming generation through the mesh: preprocess renders and tokenizes the prompt, inference
generates on a decoupled ModelStreamInfer (one response per token; our inference service puts
the tokens a lagging reader has not taken yet in one response, up to TOKENS_PER_RESPONSE),
postprocess turns each response's tokens into text in one round trip and finds stop strings, and
the caller gets one Step per token (a response's text on its last token), then a final Step.

`GenerationRequest.token_bounds` sizes what admission (service/generate.py) reserves before
the prompt is tokenized; the model's token limits are checked by preprocess on the real counts.

Transport-neutral: the OpenAI, TGI and gRPC front ends render the same Steps. Closing the
iterator (a client that went away, a stop string) cancels both streams, and the inference service
drops the sequence from its batch at the next decode step.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import grpc
import orjson
from meshserve.postprocess.v1 import postprocess_pb2
from meshserve.preprocess.v1 import preprocess_pb2
from meshserve.tasks.v1 import tasks_pb2
from tritonclient.grpc import service_pb2

from services.common.catalog import ModelEntry
from services.common.clients import InferenceClient, PostprocessClient, PreprocessClient
from services.common.errors import ErrorCode, MeshError, code_of
from services.common.generation_contract import FinishReason, InputTensor, OutputTensor, RequestParameter
from services.common.generation_contract import ResponseParameter as Reply

# Tokens a plain prompt may have beyond one per UTF-8 byte: BOS/EOS and a tokenizer's prefix space.
PROMPT_EXTRA_TOKENS = 4
# What a chat template typically adds per message (role markers, separators): only for the
# tokens-per-minute estimate; the budget holds the model's prompt limit for a chat.
CHAT_TOKENS_PER_MESSAGE = 8
# Most tokens one inference response may carry (`max_tokens_per_response`): a lone stream still
# gets one token per response; streams that share a large batch get up to this many per message
# (our embedded server's send_interval), so a client sees text at least every 8 decode steps.
TOKENS_PER_RESPONSE = 8


@dataclass(frozen=True)
class SamplingExtras:
    """The OpenAI and vLLM sampling fields beyond the common ones (see generation.proto's
    GenerationRequestParameters for their meaning); None leaves the scheduler's default."""

    min_p: float | None = None
    ignore_eos: bool = False
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides the model's own
    # Raw token log-probabilities on every Step (Step.logprob), with `top_logprobs` alternatives.
    logprobs: bool = False
    top_logprobs: int = 0

    def write(self, pb: service_pb2.ModelInferRequest) -> None:
        """Put the extras that are set into the request's parameters."""
        for name, value in (
            (RequestParameter.MIN_P, self.min_p),
            (RequestParameter.FREQUENCY_PENALTY, self.frequency_penalty),
            (RequestParameter.PRESENCE_PENALTY, self.presence_penalty),
        ):
            if value:
                pb.parameters[name].double_param = value
        if self.ignore_eos:
            pb.parameters[RequestParameter.IGNORE_EOS].bool_param = True
        if self.logit_bias:
            text = orjson.dumps({str(token): bias for token, bias in self.logit_bias.items()}).decode()
            pb.parameters[RequestParameter.LOGIT_BIAS].string_param = text
        if self.logprobs:
            pb.parameters[RequestParameter.LOGPROBS].bool_param = True
            if self.top_logprobs:
                pb.parameters[RequestParameter.TOP_LOGPROBS].int64_param = self.top_logprobs


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a chat (messages) or a plain prompt, and how."""

    messages: list[tuple[str, str]] | None = None
    prompt: str | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    # TGI's decoder_input_details: the final Step lists the prompt's tokens and their logprobs.
    prompt_logprobs: bool = False
    sampling: SamplingExtras | None = None  # the OpenAI and vLLM extras, when any was given
    n: int = 1  # OpenAI's `n`: choices, each its own sequence in the same batch (seeds seed + i)

    def choice(self, index: int) -> GenerationRequest:
        """The request of choice `index` of n: one sequence, seeded seed + index (within int64)."""
        seed = self.seed
        if seed is not None:
            seed = (seed + index + 2**63) % 2**64 - 2**63
        return replace(self, n=1, seed=seed)

    # Structured output: a JSON schema's text the output is held to (response_format, a forced
    # tool call); the tools to render into a chat (JSON text); per message its tool fields.
    json_schema: str | None = None
    tools_json: str | None = None
    message_extras: tuple[dict | None, ...] = ()

    @property
    def prompt_field(self) -> str:
        return "messages" if self.messages is not None else "prompt"

    def chars(self) -> int:
        """Characters of the prompt or of every message (len() of a str is O(1))."""
        if self.messages is not None:
            return sum(len(content) for _, content in self.messages)
        return len(self.prompt or "")

    def token_bounds(self, entry: ModelEntry) -> tuple[int, int]:
        """(most prompt tokens, most new tokens) without a tokenizer: what admission reserves.
        A prompt over the model's prompt limit is refused after tokenizing, so that limit bounds
        every prompt; a plain prompt has at most a token per UTF-8 byte (plus special tokens), a
        chat's rendered template adds text the gateway cannot see, so a chat gets the limit. New
        tokens: max_tokens (at most the model's total), else the model's default."""
        spec = entry.preprocess
        max_input = spec.max_input_tokens or spec.max_length
        max_total = spec.max_total_tokens or spec.max_length
        prompt = max_input
        if self.messages is None:
            prompt = min(max_input, len((self.prompt or "").encode()) + PROMPT_EXTRA_TOKENS)
        new = min(self.max_new_tokens, max_total) if self.max_new_tokens is not None else spec.default_max_new_tokens
        return prompt, new * self.n

    def tokens_estimate(self, entry: ModelEntry) -> int:
        """Prompt + new tokens for the tokens-per-minute room check (the window charges the real
        count): the prompt's UTF-8 bytes, plus a chat template's usual overhead, within the bounds."""
        prompt, new = self.token_bounds(entry)
        if self.messages is not None:
            size = sum(len(content.encode()) + CHAT_TOKENS_PER_MESSAGE for _, content in self.messages)
            prompt = min(prompt, size + PROMPT_EXTRA_TOKENS)
        return prompt + new

    def check_length(self, entry: ModelEntry) -> None:
        """The prompt's character cap (the model's `max_chars`), before anything renders it."""
        chars, limit = self.chars(), entry.preprocess.max_chars
        if chars > limit:
            raise MeshError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"`{self.prompt_field}` has {chars} characters; model {entry.id!r} takes at most {limit}",
                param=self.prompt_field,
            )


@dataclass(frozen=True)
class Prepared:
    """The tokenized prompt and its limits (what admission and budgets need)."""

    input_ids: list[int]
    max_new_tokens: int
    stop_token_ids: list[int]

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PrefillToken:
    """A prompt token as TGI's prefill details list it: its own text, and its log-probability
    given the tokens before it (None for the first, which nothing precedes)."""

    id: int
    text: str
    logprob: float | None


def _add_tools(pb: preprocess_pb2.PrepareGenerationRequest, request: GenerationRequest) -> None:
    """A chat's tools and its messages' tool calls and tool call ids (services/preprocess/tools.py)."""
    import json

    if request.tools_json:
        pb.tools_json = request.tools_json
    for message, extras in zip(pb.messages.messages, request.message_extras, strict=False):
        if extras and extras.get("tool_calls"):
            message.tool_calls_json = json.dumps(extras["tool_calls"])
        if extras and extras.get("tool_call_id"):
            message.tool_call_id = str(extras["tool_call_id"])


def _checked(response: service_pb2.ModelStreamInferResponse) -> service_pb2.ModelInferResponse:
    """The response, or its error as a MeshError: our inference service names the code; Triton's
    own errors are bare messages, most often a request it refused."""
    if response.error_message:
        slug = response.infer_response.parameters[Reply.ERROR_CODE].string_param
        raise MeshError(code_of(slug, ErrorCode.INVALID_INPUT), response.error_message)
    return response.infer_response


def _tokens(out: service_pb2.ModelInferResponse) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A token response's ids (INT64 [n]: one from Triton, several from our inference service when
    the reader lagged) and their logprobs (zeros when absent)."""
    raw = out.raw_output_contents
    if len(raw) > 2:  # more outputs than the token's own (top_logprobs): find them by name
        names = [o.name for o in out.outputs]
        raw = [raw[names.index(OutputTensor.TOKEN_ID)], raw[names.index(OutputTensor.LOGPROB)]]
    n = len(raw[0]) // 8
    if n < 1:
        raise MeshError(ErrorCode.INTERNAL, "the inference service sent a token response without tokens")
    tokens = struct.unpack(f"<{n}q", raw[0])
    logprobs = struct.unpack(f"<{n}f", raw[1]) if len(raw) > 1 and len(raw[1]) == 4 * n else (0.0,) * n
    return tokens, logprobs


def _top(out: service_pb2.ModelInferResponse, n: int) -> list[list[tuple[int, float]]]:
    """Per token of a response its alternatives (`top_token_ids` INT64 [n, k] and `top_logprobs`
    FP32 [n, k]); empty lists when the response has none."""
    names = [o.name for o in out.outputs]
    if OutputTensor.TOP_TOKEN_IDS not in names or OutputTensor.TOP_LOGPROBS not in names:
        return [[] for _ in range(n)]
    raw_ids = out.raw_output_contents[names.index(OutputTensor.TOP_TOKEN_IDS)]
    raw_scores = out.raw_output_contents[names.index(OutputTensor.TOP_LOGPROBS)]
    k = len(raw_ids) // 8 // n
    if k * n * 8 != len(raw_ids) or len(raw_scores) != 4 * k * n:
        raise MeshError(ErrorCode.INTERNAL, "the inference service sent top logprobs of the wrong shape")
    ids, scores = struct.unpack(f"<{n * k}q", raw_ids), struct.unpack(f"<{n * k}f", raw_scores)
    return [list(zip(ids[i * k : (i + 1) * k], scores[i * k : (i + 1) * k], strict=True)) for i in range(n)]


@dataclass(frozen=True)
class TopToken:
    """One of a generated token's most likely alternatives (OpenAI's top_logprobs entry)."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Step:
    """One generated token (text may be empty while held back, or when a later token of the same
    response carries it), or the final step. `more`: the next step is already here (the same
    inference response), so a writer may join their events into one write."""

    text: str
    token_id: int = 0
    token_text: str = ""
    logprob: float = 0.0
    final: bool = False
    more: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill: tuple[PrefillToken, ...] = ()  # the final step's, when the request asked for them
    index: int = 0  # the choice's (n > 1: the steps of the choices come interleaved, each ends)
    # With top_logprobs: the token's most likely alternatives (id, text, raw logprob), best first.
    top: tuple[TopToken, ...] = ()


class Generator:
    def __init__(
        self, preprocess: PreprocessClient, inference: InferenceClient, postprocess: PostprocessClient
    ) -> None:
        self.preprocess = preprocess
        self.inference = inference
        self.postprocess = postprocess

    async def prepare(self, entry: ModelEntry, request: GenerationRequest) -> Prepared:
        pb = preprocess_pb2.PrepareGenerationRequest(model_id=entry.id)
        if request.messages is not None:
            pb.messages.messages.extend(tasks_pb2.ChatMessage(role=r, content=c) for r, c in request.messages)
            _add_tools(pb, request)
        else:
            pb.text = request.prompt or ""
        if request.max_new_tokens is not None:
            pb.max_new_tokens = request.max_new_tokens
        reply = await self.preprocess.prepare_generation(pb)
        if request.min_new_tokens and request.min_new_tokens > reply.max_new_tokens:
            raise MeshError(
                ErrorCode.INVALID_INPUT,
                f"`min_tokens` ({request.min_new_tokens}) is more than the {reply.max_new_tokens} tokens this request "
                "may generate",
                param="min_tokens",
            )
        return Prepared(list(reply.input_ids), reply.max_new_tokens, list(reply.stop_token_ids))

    def _infer_request(self, entry: ModelEntry, prepared: Prepared, request: GenerationRequest):
        pb = service_pb2.ModelInferRequest(model_name=entry.inference.name, id="0")
        pb.inputs.add(
            name=InputTensor.INPUT_IDS, datatype=InputTensor.INPUT_IDS.datatype, shape=[prepared.prompt_tokens]
        )
        pb.raw_input_contents.append(struct.pack(f"<{prepared.prompt_tokens}q", *prepared.input_ids))
        extras = request.sampling
        # ignore_eos (vLLM's): the model's own end tokens (preprocess's list) do not end it either.
        model_stops = () if extras is not None and extras.ignore_eos else prepared.stop_token_ids
        stop_ids = sorted({*model_stops, *(extras.stop_token_ids if extras else ())})
        if stop_ids:
            stops = InputTensor.STOP_TOKEN_IDS
            pb.inputs.add(name=stops, datatype=stops.datatype, shape=[len(stop_ids)])
            pb.raw_input_contents.append(struct.pack(f"<{len(stop_ids)}q", *stop_ids))
        pb.parameters[RequestParameter.MAX_TOKENS].int64_param = prepared.max_new_tokens
        # Triton sends the flagged empty final response of a decoupled model only when asked.
        pb.parameters[RequestParameter.TRITON_ENABLE_EMPTY_FINAL_RESPONSE].bool_param = True
        pb.parameters[RequestParameter.MAX_TOKENS_PER_RESPONSE].int64_param = TOKENS_PER_RESPONSE
        for name, value in (
            (RequestParameter.TEMPERATURE, request.temperature),
            (RequestParameter.TOP_P, request.top_p),
            (RequestParameter.REPETITION_PENALTY, request.repetition_penalty),
        ):
            if value is not None:
                pb.parameters[name].double_param = value
        if request.top_k is not None:
            pb.parameters[RequestParameter.TOP_K].int64_param = request.top_k
        if request.seed is not None:
            pb.parameters[RequestParameter.SEED].int64_param = request.seed
        if request.min_new_tokens:
            pb.parameters[RequestParameter.MIN_TOKENS].int64_param = request.min_new_tokens
        if request.prompt_logprobs:
            pb.parameters[RequestParameter.PROMPT_LOGPROBS].bool_param = True
        if extras is not None:
            extras.write(pb)
        if request.json_schema:
            pb.parameters[RequestParameter.JSON_SCHEMA].string_param = request.json_schema
        return pb

    def stream(self, entry: ModelEntry, prepared: Prepared, request: GenerationRequest) -> AsyncIterator[Step]:
        """Generate; yields a Step per token and a final Step. n > 1: the n choices' steps,
        interleaved as they come, each tagged with its index and ending with its own final Step."""
        if request.n == 1:
            return self._stream_one(entry, prepared, request)
        return _merged([self._stream_one(entry, prepared, request.choice(i)) for i in range(request.n)])

    async def _stream_one(
        self, entry: ModelEntry, prepared: Prepared, request: GenerationRequest
    ) -> AsyncIterator[Step]:
        """One sequence's steps. Cancels both streams when closed."""
        infer = self.inference.stream_infer()
        detok = self.postprocess.detokenize()
        completion, prefill = 0, ()
        want_top = bool(request.sampling and request.sampling.logprobs and request.sampling.top_logprobs)
        try:
            await infer.write(self._infer_request(entry, prepared, request))
            await infer.done_writing()
            start = postprocess_pb2.DetokenizeStart(model_id=entry.id, stop=request.stop)
            await self._send(detok, postprocess_pb2.DetokenizeRequest(start=start))
            async for response in infer:
                out = _checked(response)
                if out.outputs and out.outputs[0].name == OutputTensor.PROMPT_LOGPROBS:  # first, when asked for
                    prefill = await self._prefill(detok, prepared.input_ids, out.raw_output_contents[0])
                    continue
                if request.prompt_logprobs and not prefill:
                    raise MeshError(ErrorCode.INTERNAL, "the inference service did not return the prompt's logprobs")
                if out.parameters[Reply.TRITON_FINAL_RESPONSE].bool_param:
                    # Triton's final response of a decoupled model carries no parameters: there the
                    # reason follows from the count (a generation stops short only at an end token).
                    reason = out.parameters[Reply.FINISH_REASON].string_param or (
                        FinishReason.LENGTH if completion >= prepared.max_new_tokens else FinishReason.STOP
                    )
                    tail = await self._detokenize(detok, [], last=True)
                    yield Step(tail.text, final=True, finish_reason=reason, prompt_tokens=prepared.prompt_tokens,
                               completion_tokens=completion, prefill=prefill)  # fmt: skip
                    return
                tokens, logprobs = _tokens(out)
                piece = await self._detokenize(detok, tokens, last=False)
                texts = piece.token_texts
                tops = await self._alternatives(detok, out, len(tokens)) if want_top else [()] * len(tokens)
                if piece.stopped:  # a stop string: end here, the text stops before it
                    # The tokens before the one that completed it are steps; that one is counted.
                    for i in range(len(texts) - 1):
                        yield Step("", tokens[i], texts[i], logprobs[i], more=True, top=tops[i])
                    completion += len(texts) or 1
                    yield Step(piece.text, final=True, finish_reason=FinishReason.STOP, prompt_tokens=prepared.prompt_tokens,
                               completion_tokens=completion, prefill=prefill)  # fmt: skip
                    return
                completion += len(tokens)
                last = len(tokens) - 1
                for i, token in enumerate(tokens):
                    text, more = (piece.text, False) if i == last else ("", True)
                    yield Step(text, token, texts[i] if i < len(texts) else "", logprobs[i], more=more, top=tops[i])
            raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, "the inference stream ended without a final response")
        except grpc.aio.AioRpcError as err:
            raise MeshError.from_rpc_error(err, upstream="inference") from err
        finally:
            infer.cancel()
            detok.cancel()

    async def _prefill(self, detok, input_ids: list[int], raw: bytes) -> tuple[PrefillToken, ...]:
        """The prompt's tokens from the inference service's scores (FP32, NaN for the first) and
        postprocess's texts."""
        scores = struct.unpack(f"<{len(raw) // 4}f", raw)
        if len(scores) != len(input_ids):
            raise MeshError(ErrorCode.INTERNAL, f"{len(scores)} prompt logprobs for {len(input_ids)} prompt tokens")
        texts = await self._ask(
            detok, postprocess_pb2.DetokenizeRequest(prompt=postprocess_pb2.PromptTokens(token_ids=input_ids))
        )
        return tuple(
            PrefillToken(token, text, None if score != score else score)  # NaN: the first token
            for token, text, score in zip(input_ids, texts.token_texts, scores, strict=True)
        )

    async def _alternatives(self, detok, out, n: int) -> list[tuple[TopToken, ...]]:
        """Per token of a response its alternatives with their texts (postprocess's per-token
        texts, special tokens included, as for the prompt's tokens)."""
        top = _top(out, n)
        ids = sorted({token for row in top for token, _ in row})
        if not ids:
            return [()] * n
        reply = await self._ask(
            detok, postprocess_pb2.DetokenizeRequest(prompt=postprocess_pb2.PromptTokens(token_ids=ids))
        )
        text_of = dict(zip(ids, reply.token_texts, strict=True))
        return [tuple(TopToken(token, text_of[token], score) for token, score in row) for row in top]

    async def _detokenize(self, detok, tokens: list[int], *, last: bool) -> postprocess_pb2.DetokenizeResponse:
        chunk = postprocess_pb2.TokenChunk(token_ids=tokens, last=last)
        return await self._ask(detok, postprocess_pb2.DetokenizeRequest(tokens=chunk))

    async def _ask(self, detok, request: postprocess_pb2.DetokenizeRequest) -> postprocess_pb2.DetokenizeResponse:
        await self._send(detok, request)
        try:
            reply = await detok.read()
        except grpc.aio.AioRpcError as err:
            raise MeshError.from_rpc_error(err, upstream="postprocess") from err
        if reply is grpc.aio.EOF:
            raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, "the detokenization stream ended early")
        return reply

    @staticmethod
    async def _send(detok, request: postprocess_pb2.DetokenizeRequest) -> None:
        """Write to the Detokenize stream. When postprocess has already ended the call (it refused an
        earlier message), the write cannot go out: the call's own status is the error to report, and
        the read that follows raises it, so it is not lost as a generic failure."""
        try:
            await detok.write(request)
        except asyncio.InvalidStateError:
            pass
        except grpc.aio.AioRpcError as err:
            raise MeshError.from_rpc_error(err, upstream="postprocess") from err


async def _merged(streams: list[AsyncIterator[Step]]) -> AsyncIterator[Step]:
    """The steps of several streams as they come, each with its stream's index; the first failure
    is raised (the other streams are closed, as they are when this one is)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Step]) -> None:
        try:
            async with aclosing(stream):
                async for step in stream:
                    queue.put_nowait((index, step))
        except Exception as err:
            queue.put_nowait((index, err))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item if index == 0 else replace(item, index=index)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

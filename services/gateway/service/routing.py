"""Requests routed over providers: a model id (`id`, `id:provider`, `id:policy`, or a per-provider
path's provider) becomes a Route of candidates; a route whose only candidate is the local mesh runs
the existing use cases unchanged (the routes check `Route.local_only`), any other runs here: admitted
once at the dearest candidate's price, tried candidate by candidate through the attempt loop
(providers.failover), settled at the price of the provider that answered, with the upstream's token
counts when it reports them.

A generation's attempt ends only once its first delta (a remote stream) or first step (the local
mesh) is in hand, so failing over never repeats text the client already got; a stream that fails
after that pays for what it delivered (Metered.delivered).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson
from meshserve.tasks.v1 import tasks_pb2

from services.common import caps, deadlines
from services.common.catalog import ModelEntry, PricingSpec
from services.common.errors import ErrorCode, MeshError, invalid
from services.gateway.control.metering import Metered, Metering
from services.gateway.pipeline.coalescer import Embedded
from services.gateway.pipeline.generation import GenerationRequest, Prepared, Step
from services.gateway.providers.registry import RemoteModel, Selection, local_only
from services.gateway.providers.types import LOCAL, Candidate, Delta, UpstreamError
from services.gateway.service.bounds import text_token_bound, token_bound
from services.gateway.service.context import CallContext
from services.gateway.service.embed import EmbedService
from services.gateway.service.generate import GenerateService, Generation
from services.gateway.service.predict import Answer, PredictService
from services.gateway.service.rerank import TASK as RANKING
from services.gateway.service.rerank import Ranked, sorted_scores

if TYPE_CHECKING:
    from services.gateway.providers import Providers

# Bounds of a model only remote providers serve (no tokenizer, no model limits of our own).
REMOTE_CONTEXT = 32768  # prompt tokens when the provider does not say its context length
REMOTE_NEW_TOKENS = 4096  # new tokens when the request does not say max_tokens
REMOTE_TEMPLATE_TOKENS = 64  # what a chat template upstream may add (a default system prompt, role markers)
PROMPT_EXTRA_TOKENS = 4
CHAT_TOKENS_PER_MESSAGE = 8
_ROUTE_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class Route:
    """A request's model and the providers to try for its op."""

    model_id: str
    entry: ModelEntry | RemoteModel
    selection: Selection
    local_only: bool  # the local mesh is the only candidate: the routes run their local path


@dataclass(slots=True)
class LocalTask:
    """An HF task request parsed for the local mesh (the routes parse it: the parsers and renderers
    belong to the HTTP dialect): what PredictService runs, and how its result becomes the body."""

    inputs: tasks_pb2.TaskInputs
    parameters: tasks_pb2.TaskParameters
    render: Callable[[object], bytes]


def prompt_size(request: GenerationRequest) -> int:
    """A prompt's most tokens before any context limit: its UTF-8 bytes (a chat: plus a template's
    usual overhead per message) and the special tokens."""
    if request.messages is not None:
        size = sum(len(content.encode()) + CHAT_TOKENS_PER_MESSAGE for _, content in request.messages)
    else:
        size = len((request.prompt or "").encode())
    return size + PROMPT_EXTRA_TOKENS


def remote_bounds(request: GenerationRequest, context_length: int | None, size: int | None = None) -> tuple[int, int]:
    """(most prompt tokens, most new tokens) of a generation on a remote provider, without a
    tokenizer: prompt_size() (`size`, when computed already; a chat: plus what a template may add),
    at most the context; new tokens:
    max_tokens, else min(context, 4096)."""
    size = prompt_size(request) if size is None else size
    if request.messages is not None:  # a remote chat template we cannot see (a default system prompt)
        size += REMOTE_TEMPLATE_TOKENS
    prompt = min(context_length or REMOTE_CONTEXT, size)
    new = request.max_new_tokens or min(context_length or REMOTE_NEW_TOKENS, REMOTE_NEW_TOKENS)
    return prompt, new


def worst_pricing(candidates: tuple[Candidate, ...], max_input: int, max_output: int, compute_s: float) -> PricingSpec:
    """The dearest candidate's pricing for a request of these bounds (what the budget holds)."""
    return max((c.pricing for c in candidates), key=lambda p: p.cost(max_input, max_output, compute_s))


def _upstream_body(request: GenerationRequest, max_new_tokens: int) -> dict:
    """A generation as the upstream adapters take it."""
    if request.messages is not None:
        body: dict[str, Any] = {"messages": [{"role": r, "content": c} for r, c in request.messages]}
    else:
        body = {"prompt": request.prompt or ""}
    body["max_tokens"] = max_new_tokens
    for key, value in (
        ("temperature", request.temperature),
        ("top_p", request.top_p),
        ("seed", request.seed),
        ("min_tokens", request.min_new_tokens),
    ):
        if value is not None:
            body[key] = value
    if request.stop:
        body["stop"] = list(request.stop)
    return body


def _step(delta: Delta, completion: int) -> Step:
    """An upstream's delta as a pipeline Step (the final one with the token counts: the upstream's,
    else `completion` deltas and no prompt tokens)."""
    if not delta.final:
        return Step(delta.text, token_text=delta.text)
    return Step(
        delta.text,
        final=True,
        finish_reason=delta.finish_reason or "stop",
        prompt_tokens=delta.prompt_tokens or 0,
        completion_tokens=completion if delta.completion_tokens is None else delta.completion_tokens,
    )


@dataclass(slots=True)
class _Opened:
    """A generation whose first step is in hand: the rest comes from `rest` (Steps from the local
    mesh, Deltas from a remote provider), closed however the stream ends."""

    first: Step | Delta
    rest: Any
    prepared: Prepared
    upstream_request_id: str | None = None


class RoutingService:
    """Routes requests over the providers and runs the ones the local mesh does not serve alone."""

    def __init__(
        self,
        providers: Providers,
        catalog,
        metering: Metering,
        embed: EmbedService,
        generate: GenerateService,
        predict: PredictService,
        *,
        timeout_s: float = 60.0,
    ) -> None:
        """`timeout_s`: a request's deadline when the caller set none (the attempt loop's end)."""
        self.providers = providers
        self.registry = providers.registry
        self.catalog = catalog
        self.metering = metering
        self.embed = embed
        self.generate = generate
        self.tasks = predict
        self.timeout_s = timeout_s
        self._routes: dict[tuple, Route] = {}  # local-only routes: the same answer every time

    def provider_names(self) -> tuple[str, ...]:
        """Every provider, `local` included, in the file's (preferred) order."""
        return self.registry.names

    def default_task(self, model: str) -> str:
        """The task a bare model URL runs (the model may carry a provider or policy suffix)."""
        return self.registry.model(self.registry.parse(model)[0]).default_task

    def route(self, model: str | None, op: str, *, provider: str | None = None, principal) -> Route:
        """The model's candidates for `op`: the policy's order, the key's providers only, a named
        provider (a suffix or a per-provider path's; both must agree) alone."""
        allowed = principal.allowed_providers
        key = (model, op, provider, allowed)
        found = self._routes.get(key)
        if found is not None:
            return found
        if not model:
            raise invalid("`model` is required", param="model")
        registry = self.registry
        model_id, suffix, policy = registry.parse(model)
        if provider is not None and suffix is not None and suffix != provider:
            raise invalid(
                f"model {model!r} names provider {suffix!r} but the path names provider {provider!r}", param="model"
            )
        selection = registry.candidates(model_id, op, provider=provider or suffix, policy=policy, allowed=allowed)
        found = Route(model_id, registry.model(model_id), selection, local_only(selection))
        if found.local_only:
            if len(self._routes) >= _ROUTE_CACHE_MAX:  # model strings are the callers': bounded
                self._routes.clear()
            self._routes[key] = found
        return found

    # -- admission and the attempt loop ----------------------------------------------------------
    async def _admit(
        self, ctx: CallContext, route: Route, task: str, max_input: int, max_output: int = 0, hint: int | None = None
    ) -> Metered:
        """Admitted once for every attempt: the budget holds the dearest candidate's price."""
        pricing = worst_pricing(route.selection.candidates, max_input, max_output, self.metering.timeout_s)
        return await self.metering.admit(
            ctx.principal, route.entry, task, ctx.route, ctx.request_id,
            max_input_tokens=max_input, max_output_tokens=max_output, tokens_hint=hint,
            client_request_id=ctx.client_request_id, pricing=pricing,
        )  # fmt: skip

    async def _attempt(
        self, route: Route, metered: Metered, call: Callable[[Candidate], Awaitable], op: str, hold: bool = False
    ):
        """`call` on the candidates until one answers; `metered` says who answered (or was tried
        last), after how many attempts, at its price. Returns (the result, the candidate), plus
        `leave` (frees the provider's gate slot when the stream ends) when `hold`."""
        metered.attempts, metered.routed = 0, True

        async def counted(candidate: Candidate):
            metered.attempts += 1
            metered.provider = candidate.provider
            return await call(candidate)

        deadline = time.monotonic() + deadlines.timeout_for(self.timeout_s)
        result, candidate, attempts, *held = await self.providers.attempt(
            route.selection, counted, deadline=deadline, op=op, hold=hold
        )
        metered.provider, metered.attempts, metered.pricing = candidate.provider, len(attempts), candidate.pricing
        return (result, candidate, *held)

    def _local_entry(self, route: Route) -> ModelEntry | None:
        """The catalog entry when the local mesh is among the candidates."""
        if isinstance(route.entry, ModelEntry) and any(c.provider == LOCAL for c in route.selection.candidates):
            return route.entry
        return None

    # -- generation ------------------------------------------------------------------------------
    def _generation_bounds(self, route: Route, request: GenerationRequest, size: int) -> tuple[int, int]:
        """The largest (prompt, new) token bounds over the candidates (`size`: prompt_size())."""
        entry = self._local_entry(route)
        prompt, new = 0, 0
        for c in route.selection.candidates:
            if c.provider == LOCAL and entry is not None:
                p, n = request.token_bounds(entry)
            else:
                p, n = remote_bounds(request, c.context_length, size)
            prompt, new = max(prompt, p), max(new, n)
        return prompt, new

    async def start(
        self, ctx: CallContext, route: Route, request: GenerationRequest, op: str = "chat", stream: bool = False
    ) -> Generation:
        """Admit, then try the candidates until one has produced its first step; the Generation
        streams that step and the rest (respond() renders it). Nothing reached the client yet when
        a candidate fails here, so failing over is safe."""
        size = prompt_size(request)
        max_input, max_output = self._generation_bounds(route, request, size)
        metered = await self._admit(ctx, route, "text-generation", max_input, max_output, size + max_output)
        try:
            call = lambda c: self._open(ctx, route, request, c, stream, size)  # noqa: E731
            opened, c, leave = await self._attempt(route, metered, call, op, hold=True)
        except BaseException as err:
            await self.metering.track(metered).fail(err)
            raise
        metered.upstream_request_id = opened.upstream_request_id
        # A remote provider's prompt tokens come with its usage at the end; until then (and when it
        # never says) the estimate: a token per 4 UTF-8 bytes.
        prompt = opened.prepared.prompt_tokens if c.provider == LOCAL else -(-size // 4)
        metered.add(input_tokens=prompt, items=1)
        stats, breakers = self.providers.stats, self.providers.breakers

        def ended(ok: bool, tokens: int, seconds: float) -> None:
            """How the stream ended, for the provider's health: tokens per second of a stream that
            ended well; a failure mid-way counts against its error rate and breaker."""
            if ok:
                if stream:  # a non-streamed answer was read whole inside the attempt: no rate to measure
                    stats.record_throughput(c.provider, c.model_id, output_tokens=tokens, seconds=seconds)
                return
            stats.record(c.provider, c.model_id, ok=False, latency_s=seconds)
            breakers.failure(c.provider, c.model_id)

        async def abandon() -> None:  # the client left before the steps: the gate slot goes too
            try:
                await opened.rest.aclose()
            finally:
                leave()

        stream_of = _stream_of(opened, metered, stream, ended, leave)
        return Generation(route.entry, request, opened.prepared, metered, self.metering, stream_of, abandon=abandon)

    async def _open(
        self, ctx: CallContext, route: Route, request: GenerationRequest, c: Candidate, stream: bool, size: int
    ) -> _Opened:
        """One attempt: the candidate's generation, opened, its first step read."""
        if c.provider == LOCAL:
            return await self._open_local(route.entry, request)
        upstream = self.providers.upstream(c.provider)
        _, new = remote_bounds(request, c.context_length, size)
        body = _upstream_body(request, new)
        # As the caller asked: a stream's first token is due within first_byte_s; one body (whose
        # headers come when it is done) within total_s. Streaming every answer upstream would let
        # first_byte_s bound them all, at 15-35% more gateway CPU per request (bench/run_providers.py).
        opened = await upstream.generate(c.upstream_model, body, stream=stream, request_id=ctx.request_id)
        try:
            first = await opened.first()
        except BaseException:
            await opened.aclose()
            raise
        return _Opened(first, opened, Prepared([], new, []), opened.upstream_request_id)

    async def _open_local(self, entry: ModelEntry, request: GenerationRequest) -> _Opened:
        """The local mesh's generation: the prompt tokenized, the first step generated (its outages,
        MeshErrors the attempt loop counts as retryable, fail over; the caller's own errors do not)."""
        generator = self.generate.generator
        request.check_length(entry)
        prepared = await generator.prepare(entry, request)
        steps = generator.stream(entry, prepared, request)
        try:
            first = await anext(steps)
        except BaseException:
            await steps.aclose()
            raise
        return _Opened(first, steps, prepared)

    # -- embeddings, rerank, HF tasks ------------------------------------------------------------
    def _bound(self, route: Route, local: Callable[[ModelEntry], int], remote: int) -> int:
        """The largest input-token bound over the candidates: the local mesh's (from its model's
        limits), a remote one's (bytes plus special tokens)."""
        entry = self._local_entry(route)
        return remote if entry is None else max(remote, local(entry))

    async def embeddings(
        self, ctx: CallContext, route: Route, texts: list[str], *, dimensions: int | None = None,
        prompt_name: str | None = None,
    ) -> tuple[Embedded, dict]:  # fmt: skip
        """OpenAI embeddings over the route's candidates; returns the vectors and the usage headers."""
        remote = sum(len(t.encode()) + 2 for t in texts)
        bound = self._bound(route, lambda entry: text_token_bound(entry, texts, prompt_name), remote)
        metered = await self._admit(ctx, route, "feature-extraction", bound)
        async with self.metering.track(metered):
            call = lambda c: self._embed(ctx, route, c, texts, dimensions, prompt_name)  # noqa: E731
            (result, metered.upstream_request_id), _ = await self._attempt(route, metered, call, "embed")
            metered.add(input_tokens=result.input_tokens, items=len(texts), compute_s=result.compute_s)
        return result, metered.headers()

    async def _embed(
        self, ctx, route: Route, c: Candidate, texts, dimensions, prompt_name
    ) -> tuple[Embedded, str | None]:
        if c.provider == LOCAL:
            caps.check_texts(route.entry, texts, field="input")
            parameters = tasks_pb2.TaskParameters(truncate=False, dimensions=dimensions, prompt_name=prompt_name)
            return await self.embed.vectors(route.entry.id, texts, parameters), None
        started = time.perf_counter()
        got = await self.providers.upstream(c.provider).embed(
            c.upstream_model, list(texts), dimensions=dimensions, request_id=ctx.request_id
        )
        return Embedded(got.vectors, got.input_tokens or 0, time.perf_counter() - started), got.upstream_request_id

    async def rerank(
        self, ctx: CallContext, route: Route, query: str, texts: list[str], *, raw_scores: bool = False,
        truncate: bool = False, top_n: int | None = None,
    ) -> Ranked:  # fmt: skip
        """The documents scored against the query by the first candidate that answers."""
        inputs = tasks_pb2.TaskInputs(text_ranking=tasks_pb2.TextRankingInputs(query=query, documents=texts))
        parameters = tasks_pb2.TaskParameters(raw_scores=raw_scores, truncate=truncate)
        remote = sum(len(query.encode()) + len(t.encode()) + 4 for t in texts)
        bound = self._bound(route, lambda entry: token_bound(entry, inputs, parameters), remote)
        metered = await self._admit(ctx, route, RANKING, bound)
        async with self.metering.track(metered):

            async def call(c: Candidate):
                if c.provider == LOCAL:
                    prediction = await self.tasks.pipeline.predict(route.model_id, RANKING, inputs, parameters)
                    usage = prediction.usage
                    return prediction.result.similarities.scores, usage.input_tokens, prediction.compute_s, None
                started = time.perf_counter()
                got = await self.providers.upstream(c.provider).rerank(
                    c.upstream_model, query, list(texts), raw_scores=raw_scores, request_id=ctx.request_id
                )
                return got.scores, got.input_tokens or 0, time.perf_counter() - started, got.upstream_request_id

            (scores, tokens, compute_s, metered.upstream_request_id), _ = await self._attempt(
                route, metered, call, "rerank"
            )
            metered.add(input_tokens=tokens, items=len(texts), compute_s=compute_s)
        return Ranked(route.model_id, sorted_scores(scores, top_n), tokens, metered.headers())

    async def predict(
        self, ctx: CallContext, route: Route, task: str, body: bytes | dict,
        *, local: Callable[[], LocalTask] | None = None, headers: dict[str, str] | None = None,
    ) -> Answer:  # fmt: skip
        """An HF task request (the HF API's JSON body) over the route's candidates: an `hf`
        provider gets the body as it is and its answer goes back as it is; an embedding provider
        (openai, tei) serves feature-extraction; the local mesh runs `local()`'s parsed request
        (without it the local mesh is not tried); `headers`: what an `hf` provider gets of the
        caller's (a raw upload's Content-Type, X-Wait-For-Model, X-Use-Cache). Never cached."""
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        route = self._without_local(route) if local is None else route
        entry, parsed = self._local_entry(route), None
        bound = len(raw) + PROMPT_EXTRA_TOKENS  # the texts are in the body: at most a token per byte
        if entry is not None:
            parsed = local()
            bound = max(bound, token_bound(entry, parsed.inputs, parsed.parameters))
        metered = await self._admit(ctx, route, task, bound)
        async with self.metering.track(metered):

            async def call(c: Candidate):
                if c.provider == LOCAL:
                    result = await self.tasks._run(entry, task, parsed.inputs, parsed.parameters, False, metered)
                    return parsed.render(result), None
                return await self._remote_task(ctx, c, task, raw, metered, headers or {})

            (content, metered.upstream_request_id), _ = await self._attempt(route, metered, call, "task")
        return Answer(content, "BYPASS", metered.headers())

    async def _remote_task(self, ctx, c: Candidate, task: str, raw: bytes, metered: Metered, headers: dict):
        """(the answer's JSON, the upstream request id) of a remote provider."""
        upstream = self.providers.upstream(c.provider)
        if c.kind == "hf":
            reply = await upstream.hf_task(
                c.upstream_model, task, raw, request_id=ctx.request_id, content_type=headers.get("content-type"),
                wait_for_model=_flag(headers.get("x-wait-for-model")), use_cache=_flag(headers.get("x-use-cache")),
            )  # fmt: skip
            metered.add(items=1)
            return reply.content, reply.upstream_request_id
        if task != "feature-extraction":
            raise MeshError(ErrorCode.UNSUPPORTED_TASK, f"provider {c.provider!r} does not serve {task}", param="task")
        inputs = _hf_texts(raw)
        texts = [inputs] if isinstance(inputs, str) else inputs
        started = time.perf_counter()
        got = await upstream.embed(c.upstream_model, texts, dimensions=None, request_id=ctx.request_id)
        metered.add(input_tokens=got.input_tokens or 0, items=len(texts), compute_s=time.perf_counter() - started)
        vectors = got.vectors[0] if isinstance(inputs, str) else got.vectors
        return orjson.dumps(vectors, option=orjson.OPT_SERIALIZE_NUMPY), got.upstream_request_id

    def _without_local(self, route: Route) -> Route:
        """The route less the local mesh (a request the routes did not parse for it)."""
        others = tuple(c for c in route.selection.candidates if c.provider != LOCAL)
        if len(others) == len(route.selection.candidates):
            return route
        if not others:
            raise MeshError(
                ErrorCode.NOT_IMPLEMENTED, f"model {route.model_id!r}: no provider here serves this request"
            )
        return replace(route, selection=replace(route.selection, candidates=others))


def _stream_of(
    opened: _Opened,
    metered: Metered,
    stream: bool,
    ended: Callable[[bool, int, float], None],
    leave: Callable[[], None],
):
    """The Generation's step source: the first step, then the rest; a remote provider's deltas as
    Steps with its token counts put on `metered`. A streamed step the client took marks the
    request delivered (it pays for what it got even if the stream fails later). How the stream
    ended goes to `ended(ok, tokens, seconds)` (the provider's health); `leave()` frees the
    provider's gate slot once the stream is closed (max_concurrency bounds whole streams)."""

    async def steps(_entry, _prepared, _request) -> AsyncIterator[Step]:
        rest, started = opened.rest, time.perf_counter()
        try:
            if isinstance(opened.first, Step):
                yield opened.first
                metered.delivered = stream
                async for step in rest:
                    yield step
                    metered.delivered = stream
            else:
                async for step in _remote_steps(opened.first, rest, metered, stream):
                    yield step
            ended(True, metered.output_tokens, time.perf_counter() - started)
        except MeshError as err:
            if err.code in (ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED):
                ended(False, metered.output_tokens, time.perf_counter() - started)
            raise
        finally:
            try:
                await rest.aclose()
            finally:
                leave()

    return steps


async def _remote_steps(first: Delta, rest, metered: Metered, stream: bool) -> AsyncIterator[Step]:
    """A remote stream's deltas as Steps (for a caller who wants one body, its text as one Step:
    nothing is rendered per delta); the upstream's usage, when it says it, replaces our counts."""
    completion, delta, pieces = 0, first, []
    try:
        while not delta.final:
            completion += 1
            if stream:
                yield _step(delta, 0)
                metered.delivered = True
            else:
                pieces.append(delta.text)
            delta = await anext(rest, None)
            if delta is None:
                raise MeshError(
                    ErrorCode.UPSTREAM_UNAVAILABLE, f"provider {metered.provider!r}: the stream ended early"
                )
    except UpstreamError as err:
        code = ErrorCode.DEADLINE_EXCEEDED if err.timeout else ErrorCode.UPSTREAM_UNAVAILABLE
        raise MeshError(code, f"provider {metered.provider!r} failed mid-stream: {err.message}") from err
    if pieces:
        yield Step("".join(pieces))
    if delta.prompt_tokens is not None:
        metered.input_tokens = delta.prompt_tokens
    metered.output_tokens = completion if delta.completion_tokens is None else delta.completion_tokens
    yield _step(delta, completion)


def _flag(value: str | None) -> bool | None:
    """An HF header flag as the caller sent it (None: not sent)."""
    return None if value is None else value.strip().lower() in ("1", "true", "yes")


def _hf_texts(raw: bytes) -> str | list[str]:
    """The texts of an HF feature-extraction body: `{"inputs": str | [str, ...]}`."""
    try:
        inputs = orjson.loads(raw).get("inputs")
    except (orjson.JSONDecodeError, AttributeError):
        inputs = None
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs)):
        return inputs
    raise invalid("`inputs` must be a text or a list of texts", param="inputs")

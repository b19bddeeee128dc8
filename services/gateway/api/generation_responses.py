"""A started generation as an HTTP response: one JSON body, or an SSE stream that settles the
request when it ends, however it ends.

Every generator of a stream is closed explicitly (a client that left must stop the generation
now, not when the garbage collector finalizes a suspended generator). A stream's first step is
awaited before the 200 goes out, so that what the runtime refuses on admission (a logit_bias or
stop token id past the vocabulary) is an HTTP error in the caller's dialect, as without `stream`.
A failure after the 200 went out ends the stream with an error event and then a clean end of the
body, never a cut connection; the cause goes to the log."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing

from fastapi.responses import Response, StreamingResponse

from services.common.errors import ErrorCode, MeshError
from services.gateway.api.http_io import json_response
from services.gateway.api.sse import error_event
from services.gateway.service.generate import Collected, Generation

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator however the response ends (Starlette
    stops iterating on a disconnect but leaves the generator suspended)."""

    def __init__(self, content, *, generation: Generation | None = None, source=None, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.generation = generation
        self.source = source  # the generation's steps, already started (their first step was taken)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self.source is not None:  # a body that never started: stop the generation now
                await self.source.aclose()
            if self.generation is not None:  # a body that never started settled nothing: settle it now
                await self.generation.aclose()


async def _swallow(body):
    """End the SSE body quietly after an error event was sent (the status line is long gone)."""
    try:
        async with aclosing(body) as chunks:
            async for chunk in chunks:
                yield chunk
    except MeshError:
        return


async def _first_step(generation: Generation):
    """(the generation's steps, their first step or None): a refusal of the first step settles the
    request with its status and is raised, before any response starts."""
    source = generation.steps()
    try:
        return source, await anext(source)
    except StopAsyncIteration:
        return source, None
    except BaseException as exc:
        await source.aclose()
        await generation.metering.track(generation.metered).fail(exc)
        raise


async def _chained(first, source):
    """`first` (when there is one), then the rest of `source`."""
    if first is not None:
        yield first
    async for step in source:
        yield step


async def _stream_body(generation: Generation, events: Callable, on_error: Callable, primed):
    source, first = primed
    request_id = generation.metered.request_id
    steps = _chained(first, source)
    metered = generation.metered
    async with generation.settled(), aclosing(source), aclosing(steps), aclosing(events(steps)) as chunks:
        try:
            async for chunk in chunks:
                yield chunk
                metered.delivered = True  # it reached the client: a failure from here on still pays for it
        except MeshError as err:
            log.warning("stream of request %s failed mid-way: %s: %s", request_id, err.code.slug, err.message)
            yield on_error(err)
            raise
        except Exception as exc:  # a bug: the caller gets a generic error, the log the traceback
            log.exception("stream of request %s failed mid-way", request_id)
            err = MeshError(ErrorCode.INTERNAL, "internal error")
            yield on_error(err)
            raise err from exc


async def respond(
    generation: Generation,
    stream: bool,
    events: Callable,
    render: Callable[[Collected], object],
    on_error: Callable[[MeshError], bytes] = error_event,
    *,
    extra: dict[str, str] | None = None,
) -> Response:
    """An SSE stream of `events(steps)` (a failure mid-way: `on_error(err)`'s event), or one JSON
    body `render(collected)` with the usage headers; `extra`: more headers (a routed request's
    provider and attempts)."""
    if stream:
        primed = await _first_step(generation)
        headers = {**SSE_HEADERS, **generation.metered.rate_headers()}
        if extra:
            headers.update(extra)
        return ClosingStreamingResponse(
            _swallow(_stream_body(generation, events, on_error, primed)),
            generation=generation,
            source=primed[0],
            media_type="text/event-stream",
            headers=headers,
        )
    collected = await generation.collect()
    headers = generation.metered.headers()
    if extra:
        headers.update(extra)
    return json_response(render(collected), headers=headers)

"""HTTP to one remote provider: its aiohttp session (made lazily in the running loop), the
headers of every call (the key from its env var, static headers, X-Request-Id, W3C traceparent),
its timeouts, the mapping of every failure to UpstreamError, and generation streams (SSE) read
into Deltas.

Timeouts: `connect_s` bounds the connect and `total_s` the whole call. A stream's headers and
first delta must come within `first_byte_s` (and each later read too: a stalled stream fails), and
so must a non-streamed answer (embeddings, rerank, HF tasks: the answer is the first byte); a
non-streamed generation only within `total_s` (its headers come when it is done).
Redirects are never followed (a redirect means a misconfigured base_url: it fails over).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry import trace
from opentelemetry.propagate import inject

from services.gateway.providers.types import Delta, UpstreamError

if TYPE_CHECKING:
    from services.gateway.providers.config import ProviderSpec

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "meshserve-gateway"}
# Upstream statuses that mean "try elsewhere": the upstream is down, busy, slow, misconfigured
# (its key or model mapping) or its backend failed (TGI/TEI 424); any other 4xx is the caller's request.
RETRYABLE_4XX = frozenset({401, 403, 404, 408, 424, 429})
MAX_MESSAGE = 500
READ_BUFSIZE = 1 << 20  # SSE lines (TGI's last event holds the whole text) may exceed aiohttp's 64 KiB


def retryable_status(status: int) -> bool:
    """5xx, the 4xx above, and 3xx (a redirect: the base_url is wrong; redirects are not followed)."""
    return status >= 500 or status in RETRYABLE_4XX or 300 <= status < 400


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_message(body: bytes) -> str:
    """The upstream's own words: OpenAI `{"error": {"message"}}`, TGI/HF `{"error": "..."}`, or the text."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:MAX_MESSAGE].decode(errors="replace").strip()
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if isinstance(err, list) and err and isinstance(err[0], dict):  # FastAPI validation details
            err = err[0].get("msg", err[0])
        if err is not None:
            return str(err)[:MAX_MESSAGE]
    return body[:MAX_MESSAGE].decode(errors="replace").strip()


def failure(provider: str, exc: BaseException, *, broken: bool = False, rid: str | None = None) -> UpstreamError:
    """A transport failure (no HTTP status) as an UpstreamError. `broken`: the response had begun."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamError(f"{provider}: timed out", status=0, retryable=True, timeout=True,
                             code="upstream_timeout", upstream_request_id=rid)  # fmt: skip
    if broken:
        return UpstreamError(f"{provider}: the connection broke mid-answer ({type(exc).__name__})", status=0,
                             retryable=True, code="upstream_stream_broken", upstream_request_id=rid)  # fmt: skip
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(f"{provider}: cannot connect ({exc.os_error.strerror or exc.os_error})", status=0,
                             retryable=True, code="upstream_connect_error")  # fmt: skip
    return UpstreamError(f"{provider}: {type(exc).__name__}: {str(exc)[:MAX_MESSAGE]}", status=0, retryable=True,
                         code="upstream_unreachable", upstream_request_id=rid)  # fmt: skip


class HttpClient:
    """One provider's HTTP: a session with a connection pool sized to its max_concurrency."""

    def __init__(self, spec: ProviderSpec) -> None:
        self.name = spec.name
        self.base_url = (spec.base_url or "").rstrip("/")
        self.key_env = spec.api_key_env
        self.static = {**JSON_HEADERS, **spec.headers}
        t = spec.timeouts
        self.first_byte_s = t.first_byte_s
        self.timeout = aiohttp.ClientTimeout(
            total=t.total_s, connect=t.connect_s, sock_connect=t.connect_s, sock_read=t.first_byte_s
        )
        # A non-streamed generation sends its headers only when it is done: only total_s bounds it.
        self.long_timeout = aiohttp.ClientTimeout(total=t.total_s, connect=t.connect_s, sock_connect=t.connect_s)
        self.stream_timeout = aiohttp.ClientTimeout(
            total=t.total_s, connect=t.connect_s, sock_connect=t.connect_s, sock_read=t.first_byte_s
        )
        self.limit = spec.max_concurrency
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=self.limit, ttl_dns_cache=300, keepalive_timeout=30)
            session = self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, read_bufsize=READ_BUFSIZE, skip_auto_headers=("User-Agent",)
            )
        return session

    def headers(self, request_id: str | None) -> dict[str, str]:
        h = self.static.copy()
        if self.key_env:
            key = os.environ.get(self.key_env)
            if key:
                h["Authorization"] = f"Bearer {key}"
        if request_id:
            h["X-Request-Id"] = request_id
        if trace.get_current_span().get_span_context().is_valid:  # else there is nothing to propagate
            inject(h)
        return h

    async def open(
        self,
        path: str,
        body: bytes,
        *,
        request_id: str | None,
        stream: bool = False,
        extra: dict[str, str] | None = None,
        long: bool = False,
    ) -> aiohttp.ClientResponse:
        """POSTs `body` (JSON bytes unless `extra` sets another Content-Type) and returns the 2xx
        response with its body unread; any other status, or no response, raises UpstreamError."""
        headers = self.headers(request_id)
        if extra:
            headers.update(extra)
        if stream:
            headers["Accept"] = "text/event-stream"
        url = self.base_url + path
        timeout = self.stream_timeout if stream else self.long_timeout if long else self.timeout
        try:
            try:
                resp = await self.session().post(
                    url, data=body, headers=headers, timeout=timeout, allow_redirects=False
                )
            except aiohttp.ServerDisconnectedError:
                # The server closed the connection before any response byte (aiohttp raises this
                # only before the status line; it cannot say whether the connection was a pooled
                # keep-alive one): a keep-alive connection it closed as we sent. Once more, fresh.
                resp = await self.session().post(
                    url, data=body, headers=headers, timeout=timeout, allow_redirects=False
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise failure(self.name, exc) from None
        if resp.status < 300:
            return resp
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            raw = b""
        finally:
            resp.release()
        raise self.status_error(resp, raw)

    async def open_stream(self, path: str, payload: Any, parser: SSEParser, *, request_id: str | None) -> SSEStream:
        """A streamed call: the 2xx response as an SSEStream whose first() keeps to first_byte_s."""
        sent_at = time.monotonic()
        resp = await self.open(path, orjson.dumps(payload), request_id=request_id, stream=True)
        return SSEStream(resp, parser, self.name, self.first_byte_s, sent_at)

    def status_error(self, resp: aiohttp.ClientResponse, raw: bytes) -> UpstreamError:
        status = resp.status
        message = error_message(raw) or resp.reason or "error"
        return UpstreamError(
            f"{self.name}: {status} {message}",
            status=status,
            retryable=retryable_status(status),
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            code=f"upstream_{status}",
            upstream_request_id=resp.headers.get("x-request-id"),
            timeout=status == 408,
        )

    async def call(
        self,
        path: str,
        payload: Any,
        *,
        request_id: str | None,
        extra: dict[str, str] | None = None,
        long: bool = False,
    ) -> tuple[bytes, aiohttp.ClientResponse]:
        """One non-streamed call: the 2xx body (read once) and the response (for its headers);
        `long`: a generation, bounded by total_s only."""
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        resp = await self.open(path, body, request_id=request_id, extra=extra, long=long)
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise failure(self.name, exc, broken=True, rid=resp.headers.get("x-request-id")) from None
        finally:
            resp.release()
        return raw, resp

    async def call_json(
        self, path: str, payload: Any, *, request_id: str | None, long: bool = False
    ) -> tuple[Any, str | None, Any]:
        """A non-streamed JSON call: (the parsed body, the upstream request id, the response headers)."""
        raw, resp = await self.call(path, payload, request_id=request_id, long=long)
        rid = resp.headers.get("x-request-id")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise bad_response(self.name, "the answer is not JSON", rid) from None
        if rid is None and isinstance(data, dict) and isinstance(data.get("id"), str):
            rid = data["id"]
        return data, rid, resp.headers

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def bad_response(provider: str, what: str, rid: str | None = None) -> UpstreamError:
    return UpstreamError(f"{provider}: {what}", status=502, retryable=True, code="upstream_bad_response",
                         upstream_request_id=rid)  # fmt: skip


def client_status(event: dict) -> int | None:
    """The 4xx status an error event's payload names as the caller's error (OpenAI `type`
    invalid_request_error or a 4xx `code`, TGI `error_type` validation), else None."""
    err = event.get("error")
    if event.get("error_type") == "validation" or (isinstance(err, dict) and err.get("type") == "validation"):
        return 422
    if not isinstance(err, dict):
        return None
    code = err.get("code")
    try:
        status = int(code) if code is not None else 0
    except (TypeError, ValueError):
        status = 0
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return status
    return 400 if err.get("type") == "invalid_request_error" else None


class GenStream:
    """An opened generation (the HTTP status was 2xx): `first()` reads the first delta within
    first_byte_s, iterating gives the rest and ends with the final Delta; `aclose()` must be called
    (idempotent) and releases the connection."""

    __slots__ = ("_done", "upstream_request_id")

    def __init__(self, upstream_request_id: str | None) -> None:
        self.upstream_request_id = upstream_request_id
        self._done = False

    async def first(self) -> Delta:
        return await self.__anext__()

    def __aiter__(self) -> GenStream:
        return self

    async def __anext__(self) -> Delta:  # pragma: no cover - subclasses
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._done = True


class DoneStream(GenStream):
    """A non-streamed answer as a stream: its text, then the final Delta."""

    __slots__ = ("_deltas",)

    def __init__(self, text: Delta, final: Delta, upstream_request_id: str | None) -> None:
        super().__init__(upstream_request_id)
        self._deltas = [final, text]  # popped from the end

    async def __anext__(self) -> Delta:
        if not self._deltas:
            raise StopAsyncIteration
        return self._deltas.pop()


class SSEParser:
    """Turns one dialect's SSE `data:` payloads into Deltas; `finished` once the final is known."""

    __slots__ = ("completion_tokens", "finish_reason", "finished", "prompt_tokens")

    def __init__(self) -> None:
        self.finished = False
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, event: dict) -> Delta | None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def final(self) -> Delta:
        return Delta("", True, self.finish_reason, self.prompt_tokens, self.completion_tokens)

    def done(self) -> bool:
        """`[DONE]` was read: the stream may end."""
        return True

    def eof(self) -> bool:
        """The body ended without [DONE]: may the stream end here?"""
        return self.finished


class SSEStream(GenStream):
    """A streamed generation read line by line (`data: {...}` events, `data: [DONE]`)."""

    __slots__ = ("_first_byte_s", "_opened_at", "_parser", "_provider", "_resp", "_started")

    def __init__(
        self, resp: aiohttp.ClientResponse, parser: SSEParser, provider: str, first_byte_s: float, sent_at: float
    ) -> None:
        super().__init__(resp.headers.get("x-request-id"))
        self._resp = resp
        self._parser = parser
        self._provider = provider
        self._first_byte_s = first_byte_s
        self._started = False
        self._opened_at = sent_at  # time.monotonic() when the request went out

    async def first(self) -> Delta:
        """The first delta, within first_byte_s of sending the request; failures here are retryable."""
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + self._remaining()):
                return await self._next()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            await self.aclose()
            raise failure(self._provider, exc, broken=True, rid=self.upstream_request_id) from None
        except UpstreamError:
            await self.aclose()
            raise

    def _remaining(self) -> float:
        return max(0.0, self._first_byte_s - (time.monotonic() - self._opened_at))

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self._next()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            await self.aclose()
            err = failure(self._provider, exc, broken=True, rid=self.upstream_request_id)
            err.retryable = not self._started  # after output the caller cannot simply move on
            raise err from None
        except UpstreamError as err:
            await self.aclose()
            if self._started:
                err.retryable = False
            raise

    async def _next(self) -> Delta:
        parser = self._parser
        while True:
            if parser.finished:
                return self._end()
            name, data = await self._event()
            if data is None:
                if parser.eof():
                    return self._end()
                raise aiohttp.ClientPayloadError("the stream ended before its last event")
            if data == b"[DONE]":
                if parser.done():
                    return self._end()
                continue
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                if name == b"error":
                    self._raise_event_error(data)
                raise bad_response(self._provider, "a stream event is not JSON", self.upstream_request_id) from None
            if not isinstance(event, dict):
                raise bad_response(self._provider, "a stream event is not a JSON object", self.upstream_request_id)
            if name == b"error" or "error" in event:
                self._raise_event_error(data, event)
            delta = parser.feed(event)
            if delta is not None:
                self._started = True
                return delta

    async def _event(self) -> tuple[bytes | None, bytes | None]:
        """The next event that has data: (its `event:` name, its `data:` lines joined by "\n"), ended
        by a blank line or the body's end; (None, None) at the end. Comments and `id:`/`retry:` are
        skipped."""
        content, name, parts = self._resp.content, None, []
        while True:
            try:
                line = await content.readline()
            except (ValueError, HttpProcessingError):  # a line over the reader's limit
                raise bad_response(self._provider, "a stream line is too long", self.upstream_request_id) from None
            line = line.rstrip(b"\r\n") if line else None
            if not line:
                if parts:
                    return name, parts[0] if len(parts) == 1 else b"\n".join(parts)
                if line is None:
                    return None, None
                name = None
                continue
            if line[:1] == b":":
                continue  # a comment (keep-alive)
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                parts.append(value)
            elif field == b"event":
                name = value

    def _end(self) -> Delta:
        self._done = True
        self._resp.release()
        return self._parser.final()

    def _raise_event_error(self, data: bytes, event: dict | None = None) -> None:
        """An error event: the caller's own error (validation) is never retried; others are until
        output began."""
        client = client_status(event) if event is not None else None
        message = error_message(data) if event is not None else data[:MAX_MESSAGE].decode(errors="replace")
        raise UpstreamError(f"{self._provider}: {message}", status=client or 0,
                            retryable=client is None and not self._started, code="upstream_stream_error",
                            upstream_request_id=self.upstream_request_id)  # fmt: skip

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._resp.close()  # unread data: the connection is not reused
        else:
            self._resp.release()


ParserFactory = Callable[[], SSEParser]

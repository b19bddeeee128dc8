"""Per-connection limits of the gateway's HTTP/1.1 server that uvicorn's httptools protocol lacks:
the size of a request's headers and the time they may take to arrive; and the answer beyond
uvicorn's connection cap (`limit_concurrency`): the house OVERLOADED error with Retry-After in the
caller's dialect instead of uvicorn's plain-text 503.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`), but
nothing closes a connection that never completes its headers (slowloris) or never sends a byte, and
httptools buffers a header of any size. `protocol_class()` builds the protocol given to
`uvicorn.Config(http=...)`; everything else is uvicorn's own.
"""

from __future__ import annotations

from asyncio import TimerHandle
from dataclasses import dataclass

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.common.errors import ErrorCode, MeshError
from services.gateway.api.errors import error_response


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int  # request line + headers of one request; 431 above
    header_timeout_s: float  # from the connection's start or a request's first byte to its blank line


class _HeadersTooLarge(Exception):
    """Raised in a parser callback to stop httptools at once (uvicorn then answers nothing more)."""


def _refusal(path: str, limit: int) -> bytes:
    """431 with the error body of the caller's dialect (the path says which), then the close."""
    err = MeshError(ErrorCode.PAYLOAD_TOO_LARGE, f"request headers exceed the limit of {limit} bytes")
    response = error_response(err, path)
    return b"".join(
        [
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(response.body),
            b"connection: close\r\n\r\n",
            response.body,
        ]
    )


async def _over_capacity(scope, receive, send) -> None:
    """What a request beyond the connection cap gets, in place of uvicorn's `service_unavailable`:
    503 OVERLOADED in the caller's dialect with Retry-After; the connection is then closed."""
    err = MeshError(ErrorCode.OVERLOADED, "the gateway is at its connection limit; retry later")
    response = error_response(err, scope["path"])
    response.headers["connection"] = "close"
    await response(scope, receive, send)


def _header_bytes(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return len(url) + sum(len(name) + len(value) for name, value in headers)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit and a header timeout.

    Header bytes are counted on the wire while a request's headers are incomplete (this bounds
    what httptools buffers of an unfinished header to the limit plus one read), and exactly, URL
    and fields, once they are complete, before the app sees the request, where the wire count
    exceeds the limit or misses part of the request (pipelining). A refused request gets a
    431 and the connection is half-closed; what the client still sends is read and dropped (so the
    431 is not lost to a TCP reset) until it closes or the header timeout. The timer runs from the
    connection's start, or from a read that leaves a request's headers unfinished, until they are
    complete; then the connection is closed. Headers that arrive whole in one read, the common
    case, arm no timer at all.
    """

    limits: HttpLimits = HttpLimits(64 * 1024, 10.0)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_headers = False  # between a request's first byte and the end of its headers
        self._in_body = False  # between the end of a request's headers and the end of its body
        self._wire_bytes = 0  # bytes read since the last request's body ended
        self._requests_begun = self._begun_before_read = 0
        self._read_began_in_body = self._count_exactly = False
        self._refused = False
        self._header_timer: TimerHandle | None = None
        self._arm_header_timer()  # the first request's headers are due from the connection's start

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._read_began_in_body, self._begun_before_read = self._in_body, self._requests_begun
        if not self._in_body:
            self._wire_bytes += len(data)
        super().data_received(data)  # uvicorn stops its keep-alive timer on any byte
        if self._in_headers:
            if self._wire_bytes > self.limits.max_header_bytes:
                self._refuse()
            else:
                self._arm_header_timer()
        elif not self._in_body:
            self._wire_bytes = 0
            if self._requests_begun == self._begun_before_read and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()  # bytes that begin no request (blank lines) keep nothing open

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        # Pipelined behind another request in the same read: its bytes are not all on the wire count.
        self._count_exactly = self._read_began_in_body or self._requests_begun != self._begun_before_read
        self._requests_begun += 1

    def on_headers_complete(self) -> None:
        limit = self.limits.max_header_bytes
        # No more bytes on the wire than the limit: the headers are within it (no need to count them).
        if (self._count_exactly or self._wire_bytes > limit) and _header_bytes(self.url, self.headers) > limit:
            self._refuse()
            raise _HeadersTooLarge
        self._in_headers, self._in_body, self._wire_bytes = False, True, 0
        if self._header_timer is not None:
            self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body = False

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refusal stops the parser with an error; its 431 is already sent
            super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle, app) -> None:
        # Every request, first or pipelined, starts here; beyond limit_concurrency uvicorn hands
        # its own plain-text 503 app (uvicorn is pinned: tests/unit/test_transport_limits.py checks).
        super()._start_asgi_task(cycle, _over_capacity if app is service_unavailable else app)

    def _refuse(self) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # pipelined: the response going out ends, then uvicorn closes
            return
        path = self.url.decode("latin-1") if self._in_headers else "/"
        self.transport.write(_refusal(path, self.limits.max_header_bytes))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_class(limits: HttpLimits) -> type[HttpToolsProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with these limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})

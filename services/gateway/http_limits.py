"""Per-connection limits of the gateway's HTTP/1.1 server that uvicorn's httptools protocol lacks:
the size of a request's headers and the time they may take to arrive.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`), but
nothing closes a connection that never completes its headers (slowloris) or never sends a byte, and
httptools buffers a header of any size. `protocol_class()` builds the protocol given to
`uvicorn.Config(http=...)`; everything else is uvicorn's own.
"""

from __future__ import annotations

from asyncio import TimerHandle
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.common.errors import ErrorCode, MeshError
from services.gateway.http_api import error_response


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


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit and a header timeout.

    Bytes are counted while a request's headers are awaited: on the wire as they arrive (this
    bounds what httptools buffers of a header still incomplete to the limit plus one read), and
    exactly, field by field, once they are complete, before the app sees the request. A refused
    request gets a 431 and the connection is half-closed; what the client still sends is read and
    dropped (so that the 431 is not lost to a TCP reset) until it closes or the header timeout.
    The timer runs from the connection's start, or from the first byte of a later request, until
    the headers are complete; when it fires the connection is closed.
    """

    limits: HttpLimits = HttpLimits(64 * 1024, 10.0)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._awaiting_headers = True
        self._wire_bytes = 0  # bytes read while awaiting headers
        self._header_bytes = 0  # URL + header names and values of the request being parsed
        self._refused = False
        self._header_timer: TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_headers:
            self._wire_bytes += len(data)
            self._arm_header_timer()
        super().data_received(data)
        if self._awaiting_headers and self._wire_bytes > self.limits.max_header_bytes:
            self._refuse()

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse()
            raise _HeadersTooLarge
        self._awaiting_headers = False
        self._header_bytes = 0
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_headers = True
        self._wire_bytes = 0

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refusal stops the parser with an error; its 431 is already sent
            super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _refuse(self) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        path = self.url.decode("latin-1") if getattr(self, "url", b"") else "/"
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

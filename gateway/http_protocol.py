"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools protocol, with
what one turn of the event loop writes to a connection sent as one write.

uvicorn writes a response's status line and headers when the app sends
`http.response.start`, and its body at `http.response.body`: two `send()`
system calls and two TCP segments for every answer, the first of which wakes
the client only to wait for the second. Litestar sends both in the same turn
of the loop, so holding writes until the end of that turn sends them together.
A streamed answer's chunks come in turns of their own and go out as they come.

It also bounds a request's head (its line and headers) at MAX_HEAD_BYTES.
httptools buffers a header until its line ends and uvicorn sets no limit, so
one unauthenticated connection sending an endless header grew the gateway
without bound (200 MB of header: 104 → 389 MB resident). Past the limit the
answer is 431; a request that is not valid HTTP gets 400 (uvicorn's own is
plain text). Both are in OpenAI's shape and audited, like every refusal.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import BadRequest, GatewayError, HeadTooLarge, RequestTimeout

log = structlog.get_logger("bastion.http")

# The most a request's line and headers may take together. nginx's default
# (large_client_header_buffers) allows 32 KiB; an OIDC token fits many times.
MAX_HEAD_BYTES = 64 * 1024


class CoalescingTransport:
    """A transport whose writes made in one turn of the loop reach the socket together.

    Everything but writing and closing is the wrapped transport's own.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._transport.write(data)

    def close(self) -> None:
        self.flush()  # a `connection: close` answer is written before the socket closes
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a CoalescingTransport, with
    a bound on a request's head in bytes and in time, and refusals in OpenAI's shape.

    uvicorn closes a connection idle between requests (its keep-alive timeout)
    but sets no limit on a new connection or a request's head: a client could
    hold connections open forever by sending nothing, or a byte at a time
    (slow loris). `header_timeout` seconds after a connection opens, or after
    the first bytes of a request's head, a head that is still unfinished is
    answered 408 (or, with nothing sent, the connection is just closed).
    """

    # True from the end of one request (or the connection's start) until the
    # next request's headers are complete; bytes received meanwhile are counted.
    _in_head = True
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, header_timeout: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Flow control (pause/resume reading and writing) stays on the real transport.
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._arm_head_timer()
        super().data_received(data)
        # Only a head still unfinished after all this is refused: a chunk that
        # also carries a large body completed its head while being parsed.
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(
                HeadTooLarge(
                    f"The request line and headers are larger than {MAX_HEAD_BYTES} bytes.",
                    audit_reason="head_too_large",
                )
            )

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self._header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head arrived while the previous answer is still being
            # sent: that answer is not cut off; the head gets its time afterwards.
            self._arm_head_timer()
        elif self._head_bytes == 0:
            self.transport.close()  # an idle connection: nothing to answer
        else:
            self._refuse(
                RequestTimeout(
                    f"The request line and headers did not arrive within {self._header_timeout:g} seconds.",
                    audit_reason="header_timeout",
                )
            )

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to bytes httptools cannot parse.
        self._refuse(BadRequest("The request is not valid HTTP/1.1.", code="invalid_http"))

    def _refuse(self, err: GatewayError) -> None:
        """Answer `err` and close the connection; audited when the app has started."""
        peer = self.client[0] if self.client else None
        # The app's way to audit it (gateway/app.py), once its services have started.
        audit = getattr(getattr(self.app, "state", None), "refuse_unparsed", None)
        headers = b"content-type: application/json\r\nconnection: close\r\n"
        if audit is not None:
            request_id = audit(peer, err)
            headers += b"x-request-id: " + request_id.encode() + b"\r\n"
        else:
            log.warning("http.refused", client_addr=peer, error_type=err.audit_reason)
        body = err.body()
        status = f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n".encode()
        self.transport.write(status + headers + b"content-length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()

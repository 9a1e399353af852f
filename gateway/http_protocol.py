"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools protocol, with
what one turn of the event loop writes to a connection sent as one write.

uvicorn writes a response's status line and headers when the app sends
`http.response.start`, and its body at `http.response.body`: two `send()`
system calls and two TCP segments for every answer, the first of which wakes
the client only to wait for the second. Litestar sends both in the same turn
of the loop, so holding writes until the end of that turn sends them together.
A streamed answer's chunks come in turns of their own and go out as they come.

It also guards the connection, where uvicorn does not:

- a request's head (its line and headers) is bounded at MAX_HEAD_BYTES.
  httptools buffers a header until its line ends, so one unauthenticated
  connection sending an endless header grew the gateway without bound
  (200 MB of header: 104 → 389 MB resident). Past the limit the answer is 431;
- the head must arrive in time (`gateway.header_timeout_seconds`: 408);
- a client that leaves the answer unread for `gateway.send_timeout_seconds`
  (its socket full) is disconnected: it held its connection and engine stream;
- a body still arriving after its answer went out (a refusal that did not
  need it) is read and dropped for `gateway.body_timeout_seconds` at most,
  then the connection closes: a body trickled after the answer kept it open
  forever. Closing at once, with the body's bytes unread, would reset the
  connection, and the client could lose the answer;
- connections over `gateway.max_connections` (per client too) are answered
  503 at their first bytes, or closed if none come within TURNED_AWAY_SECONDS
  (and counted into a summary log line: gateway/connection_limits.py).

A request refused here (400, 408, 431, 503 over the caps) is answered, the
gateway's side of the connection is shut (the client reads the answer, then
end of file), and whatever the client still sends is read and dropped until it
closes its side, for `gateway.body_timeout_seconds` at most (TURNED_AWAY_SECONDS
for a connection over the caps, which is not counted): the lingering close of
nginx. Closing at once with bytes unread resets the connection, and a client
that stops at the failed write, before reading, loses the answer.

A request that is not valid HTTP gets 400 (uvicorn's own is plain text).
Refusals are in OpenAI's shape and audited, like every refusal.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.client_address import canonical
from gateway.connection_limits import ConnectionLimits
from gateway.errors import BadRequest, GatewayError, HeadTooLarge, RequestTimeout, TooManyConnections

log = structlog.get_logger("bastion.http")

# The most a request's line and headers may take together. nginx's default
# (large_client_header_buffers) allows 32 KiB; an OIDC token fits many times.
MAX_HEAD_BYTES = 64 * 1024

# How long a connection over the caps may take to send its first bytes (which
# get the 503) before it is closed unanswered. Clients send at once.
TURNED_AWAY_SECONDS = 1.0


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

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a CoalescingTransport, with
    the guards in this module's docstring, and refusals in OpenAI's shape.

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
    _send_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None
    # Set when this connection is one too many: its first bytes get this refusal.
    _turned_away: TooManyConnections | None = None
    _counted = False
    # Set once a refusal is written: what arrives after it is dropped.
    _refused = False

    def __init__(
        self,
        *args: Any,
        header_timeout: float = 30.0,
        body_timeout: float = 60.0,
        send_timeout: float = 60.0,
        limits: ConnectionLimits | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._send_timeout = send_timeout
        self._limits = limits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.client is not None:
            # The address every later step sees (the scope's "client"): an IPv4
            # client of a socket on `::` as IPv4, not `::ffff:a.b.c.d`.
            self.client = (canonical(self.client[0]), self.client[1])
        # Flow control (pause/resume reading and writing) stays on the real transport.
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        if self._limits is not None:
            self._turned_away = self._limits.open(self._peer)
            self._counted = self._turned_away is None
        if self._turned_away is not None:
            # Not counted, so not left to hold a descriptor for the head's whole timeout.
            self._head_timer = self.loop.call_later(TURNED_AWAY_SECONDS, self.transport.close)
        else:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._send_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = self._linger_timer = None
        if self._counted:
            assert self._limits is not None
            self._limits.close(self._peer)
            self._counted = False
        elif self._turned_away is not None and not self._refused:
            assert self._limits is not None
            self._limits.turned_away_silent(self._peer, self.loop)
        super().connection_lost(exc)

    @property
    def _peer(self) -> str | None:
        return self.client[0] if self.client else None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the rest of a refused request: dropped while the connection lingers
        if self._turned_away is not None:
            # Answered at its first bytes, so that the client reads a reason rather than a reset.
            if not self.transport.is_closing():
                self._refuse(self._turned_away, linger=TURNED_AWAY_SECONDS)
            return
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

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self._send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()

    def _send_timed_out(self) -> None:
        # Nothing can be said to a client that reads nothing. Dropping the
        # connection ends the call as `client_closed` (gateway/streaming.py).
        self._send_timer = None
        log.warning("http.send_timeout", client_addr=self._peer, seconds=self._send_timeout)
        self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # (self.cycle may already be a request pipelined behind this one: it is not complete.)
        if self.cycle.response_complete and self.cycle.more_body and not self.transport.is_closing():
            # The answer went out before its request's body had all arrived.
            self._linger_timer = self.loop.call_later(self._body_timeout, self.transport.close)

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._disarm_head_timer()
        # A request pipelined behind a dropped body is not cut short by its keep-alive.
        self._unset_keepalive_if_required()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        if self._linger_timer is not None:
            # The dropped body has all arrived: the connection is idle, and
            # uvicorn's keep-alive timeout applies again.
            self._linger_timer.cancel()
            self._linger_timer = None
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

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

    def _refuse(self, err: GatewayError, *, linger: float | None = None) -> None:
        """Answer `err` and close the connection, lingering (the module's
        docstring) for `linger` seconds, `body_timeout` by default; audited when
        the app has started."""
        peer = self._peer
        # The app's way to audit it (gateway/app.py), once its services have started.
        audit = getattr(getattr(self.app, "state", None), "refuse_unparsed", None)
        extra = {**err.headers(), "content-type": "application/json", "connection": "close"}
        headers = b"".join(f"{name}: {value}\r\n".encode() for name, value in extra.items())
        if audit is not None:
            request_id = audit(peer, err)
            headers += b"x-request-id: " + request_id.encode() + b"\r\n"
        else:
            log.warning("http.refused", client_addr=peer, error_type=err.audit_reason)
        body = err.body()
        status = f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n".encode()
        self.transport.write(status + headers + b"content-length: %d\r\n\r\n" % len(body) + body)
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # an answer is still being sent: nothing more can be said cleanly
            return
        self._refused = True
        self._disarm_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self.transport.can_write_eof():  # TLS cannot: its client reads to content-length
            self.transport.write_eof()
        self.flow.resume_reading()  # a body paused for flow control is drained too
        # The client's end of file closes the connection sooner (uvicorn's eof_received).
        self._linger_timer = self.loop.call_later(
            self._body_timeout if linger is None else linger, self.transport.close
        )

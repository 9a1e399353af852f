"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools protocol, with
what one turn of the event loop writes to a connection sent as one write.

uvicorn writes a response's status line and headers when the app sends
`http.response.start`, and its body at `http.response.body`: two `send()`
system calls and two TCP segments for every answer, the first of which wakes
the client only to wait for the second. Litestar sends both in the same turn
of the loop, so holding writes until the end of that turn sends them together.
A streamed answer's chunks come in turns of their own and go out as they come.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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
    """uvicorn's httptools protocol, writing through a CoalescingTransport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Flow control (pause/resume reading and writing) stays on the real transport.
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]

"""The gateway's HTTP protocol sends what one turn of the event loop writes as
one write: on a real TCP connection, and through a real gateway whose client
asks for `connection: close` (the held answer is written before the close)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from gateway.http_protocol import CoalescingTransport
from tests.conftest import GatewayFactory
from tests.support import EngineRef, SocketDouble


class _Recording:
    """A real transport, noting each write that reaches it."""

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _Collect(asyncio.Protocol):
    def __init__(self, got: bytearray, closed: asyncio.Future[None]):
        self.got, self.closed = got, closed

    def data_received(self, data: bytes) -> None:
        self.got += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(None)


def test_writes_in_one_turn_reach_the_socket_as_one_and_close_sends_what_is_held() -> None:
    async def go() -> tuple[list[bytes], bytes]:
        loop = asyncio.get_running_loop()
        got, closed = bytearray(), loop.create_future()
        server = await loop.create_server(lambda: _Collect(got, closed), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        recording = _Recording(transport)
        coalescing = CoalescingTransport(recording, loop)  # type: ignore[arg-type]
        coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        coalescing.write(b"ok")
        await asyncio.sleep(0.05)  # the turn ends: both go out together
        coalescing.write(b"held")
        coalescing.close()  # in the same turn: what is held is written first
        await asyncio.wait_for(closed, 5)
        server.close()
        return recording.writes, bytes(got)

    writes, got = asyncio.run(go())
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"held"]
    assert got == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokheld"


def test_an_answer_before_connection_close_arrives_whole(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert body == b'{"status":"ok"}'

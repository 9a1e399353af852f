"""The gateway's HTTP protocol sends what one turn of the event loop writes as
one write: on a real TCP connection, and through a real gateway whose client
asks for `connection: close` (the held answer is written before the close)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

import openai._constants

from gateway.http_protocol import MAX_HEAD_BYTES, CoalescingTransport
from tests.conftest import GatewayFactory
from tests.support import EngineRef, SocketDouble, exchange


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


def test_a_request_head_is_bounded_and_refusals_are_openai_shaped_and_audited(
    make_gateway: GatewayFactory, tripwire: SocketDouble
) -> None:
    """An endless header once grew the gateway without bound: now 431 past
    MAX_HEAD_BYTES, and bytes that are not HTTP get 400, both audited."""
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"max_body_bytes": 4 << 20})
    key = gw.create_key()
    rss = lambda: int(next(x for x in open(f"/proc/{gw.proc.pid}/status") if x.startswith("VmRSS")).split()[1])  # noqa: E731,SIM115
    before = rss()

    # 20 MB of one header, never finished: refused once the head passes the limit.
    endless = [b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: "] + [b"a" * (1 << 20)] * 20
    status, headers, body = exchange(gw.port, *endless)
    assert status == 431 and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
    assert str(MAX_HEAD_BYTES) in error["message"]
    final = gw.final(headers["x-request-id"])
    assert (final["http_status"], final["error_type"], final["client_addr"]) == (431, "head_too_large", "127.0.0.1")
    assert rss() - before < 10_000  # kB: the header was not kept

    # Not HTTP at all.
    status, headers, body = exchange(gw.port, b"\x16\x03\x01 hello, this is not http\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_http"
    assert gw.final(headers["x-request-id"])["error_type"] == "invalid_http"

    # Under the limit, a head of many headers passes; so does a large body sent
    # in the same writes as its head (only the head counts).
    many = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 100) for i in range(500))  # ~55 KB
    status, _, _ = exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + many + b"connection: close\r\n\r\n")
    assert status == 200
    body = b'{"model": "nope", "messages": [{"role": "user", "content": "' + b"a" * (3 << 20) + b'"}]}'
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n" % key.encode()
    request += b"content-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
    status, headers, _ = exchange(gw.port, request + body)
    assert status == 404 and gw.final(headers["x-request-id"])["error_type"] == "model_not_found"  # read whole


def test_a_request_head_must_arrive_in_time(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    """Slow loris: a head still unfinished `header_timeout_seconds` after its first
    byte gets 408 (audited), however steadily its bytes trickle; a connection
    that sends nothing is closed; a kept-alive connection is not timed by its age."""
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"header_timeout_seconds": 1.0})

    def trickle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            for byte in b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaa":
                conn.sendall(bytes([byte]))
                time.sleep(0.05)

    t0 = time.monotonic()
    status, headers, body = exchange(gw.port, b"", on_open=trickle)
    assert status == 408 and 0.9 < time.monotonic() - t0 < 5
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert gw.final(headers["x-request-id"])["error_type"] == "header_timeout"

    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        t0 = time.monotonic()
        assert conn.recv(100) == b""  # closed, unanswered
        assert 0.9 < time.monotonic() - t0 < 5

    request = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        for _ in range(2):
            conn.sendall(request)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(1.5)  # longer than the head's timeout, shorter than keep-alive


def test_an_idle_connection_outlasts_the_clients_reuse_window(
    make_gateway: GatewayFactory, tripwire: SocketDouble
) -> None:
    """uvicorn closes a connection after 5 s idle, the very window for which
    httpx (so the `openai` SDK) keeps one for reuse: a request sent as the
    gateway closes is lost to a reset. The gateway keeps idle connections for
    `keepalive_timeout_seconds` (75 by default), then closes them."""
    request = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    reuse_window = openai._constants.DEFAULT_CONNECTION_LIMITS.keepalive_expiry
    assert reuse_window is not None
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        conn.sendall(request)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(reuse_window + 0.5)
        conn.sendall(request)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")  # the same connection, still served

    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"keepalive_timeout_seconds": 1.0})
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        conn.sendall(request)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert conn.recv(100) == b""  # closed once idle for the configured time
        assert 0.9 < time.monotonic() - t0 < 5

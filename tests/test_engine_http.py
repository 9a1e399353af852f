"""The engine client (gateway/engine_http.py) against real sockets: an HTTP/1.1
server on loopback that answers as it is told, and counts its connections."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.engine_http import (
    BadResponse,
    BrokenOff,
    ConnectFailed,
    EnginePool,
    Origin,
    ReadTimeout,
)
from tests.support import free_port, self_signed

# How the server answers one request, given its body: bytes to write, then
# whether to close the connection.
Answer = Callable[[bytes], Awaitable[tuple[bytes, bool]]]


def ok(body: bytes, *, close: bool = False) -> bytes:
    extra = b"connection: close\r\n" if close else b""
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Engine:
    """A loopback HTTP/1.1 server: reads each request, answers with `answer`."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        return self.server.sockets[0].getsockname()[1]

    async def start_unix(self, path: Path) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-length")), 0
                )
                body = await reader.readexactly(length)
                data, close = await self.answer(body)
                writer.write(data)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


LIMIT = 1 << 20  # the most of one answer a test reads


def pool(*, read_timeout: float = 5.0, size: int = 8, keepalive: float = 4.0) -> EnginePool:
    return EnginePool(connect_timeout=2.0, read_timeout=read_timeout, size=size, keepalive=keepalive)


def origin(port: int, scheme: str = "http") -> Origin:
    return Origin.of(f"{scheme}://127.0.0.1:{port}", {"authorization": "Bearer k", "content-type": "application/json"})


async def echo(body: bytes) -> tuple[bytes, bool]:
    return ok(body), False


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_keep_alive_reuses_one_connection_and_sends_head_and_body(tmp_path: Path, transport: str) -> None:
    """Also over a Unix socket (engine_url = "unix:/path"), the same way but for the host header."""

    async def go() -> None:
        engine = Engine(echo)
        if transport == "tcp":
            o = origin(await engine.start())
            host = f"127.0.0.1:{o.port}"
        else:
            await engine.start_unix(tmp_path / "engine.sock")
            o = Origin.of(f"unix:{tmp_path / 'engine.sock'}", {"authorization": "Bearer k"})
            host = "localhost"
        p = pool()
        for i in range(5):
            r = await p.request(o, "POST", "/v1/chat/completions", b'{"n":%d}' % i)
            assert (r.status, await r.read(LIMIT)) == (200, b'{"n":%d}' % i)
        assert engine.connections == 1
        head = engine.requests[0].decode()
        assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
        assert f"host: {host}\r\n" in head and "authorization: Bearer k" in head
        await p.close()
        await engine.stop()
        if transport == "unix":
            with pytest.raises(ConnectFailed):  # nobody listens there
                await p.request(Origin.of(f"unix:{tmp_path / 'gone.sock'}", {}), "GET", "/health")

    asyncio.run(go())


def test_a_chunked_answer_arrives_in_pieces_and_whole() -> None:
    events = [b"data: %d\n\n" % i for i in range(50)]

    async def chunked(_: bytes) -> tuple[bytes, bool]:
        body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body, False

    async def go() -> None:
        engine = Engine(chunked)
        o = origin(await engine.start())
        p = pool()
        r = await p.request(o, "POST", "/x", b"{}")
        assert b"".join([c async for c in r.chunks()]) == b"".join(events)
        r = await p.request(o, "POST", "/x", b"{}")  # the connection went back to the pool
        assert await r.read(LIMIT) == b"".join(events) and engine.connections == 1
        await p.close()
        await engine.stop()

    asyncio.run(go())


def test_connection_close_and_closed_idle_connections_are_not_reused() -> None:
    calls = 0

    async def closing(body: bytes) -> tuple[bytes, bool]:
        nonlocal calls
        calls += 1
        # 1: says `connection: close`. 2: answers, then drops the idle
        # connection unannounced (as vLLM does after its keep-alive).
        return ok(body, close=calls == 1), calls <= 2

    async def go() -> None:
        engine = Engine(closing)
        o = origin(await engine.start())
        p = pool()
        assert await (await p.request(o, "POST", "/x", b"a")).read(LIMIT) == b"a"
        assert await (await p.request(o, "POST", "/x", b"b")).read(LIMIT) == b"b"
        await asyncio.sleep(0.1)
        assert await (await p.request(o, "POST", "/x", b"c")).read(LIMIT) == b"c"  # not a broken connection
        assert engine.connections == 3
        await p.close()
        await engine.stop()

    asyncio.run(go())


def test_idle_connections_past_the_keep_alive_are_not_used() -> None:
    async def go() -> None:
        engine = Engine(echo)
        o = origin(await engine.start())
        p = pool(keepalive=0.2)
        await (await p.request(o, "POST", "/x", b"a")).read(LIMIT)
        await asyncio.sleep(0.3)
        await (await p.request(o, "POST", "/x", b"b")).read(LIMIT)
        assert engine.connections == 2
        await asyncio.sleep(0.05)
        assert engine.open == 1, "the expired connection was closed"
        await p.close()
        await engine.stop()

    asyncio.run(go())


def test_the_pool_holds_at_most_its_size_of_connections() -> None:
    async def slow(body: bytes) -> tuple[bytes, bool]:
        await asyncio.sleep(0.05)
        return ok(body), False

    async def go() -> None:
        engine = Engine(slow)
        o = origin(await engine.start())
        p = pool(size=3)

        async def one(i: int) -> bytes:
            return await (await p.request(o, "POST", "/x", b"%d" % i)).read(LIMIT)

        answers = await asyncio.gather(*(one(i) for i in range(12)))
        assert answers == [b"%d" % i for i in range(12)]
        assert engine.most_open == 3 and engine.connections == 3
        await p.close()
        await engine.stop()

    asyncio.run(go())


def test_faults_are_typed_errors() -> None:
    async def hang(_: bytes) -> tuple[bytes, bool]:
        await asyncio.sleep(30)
        return b"", True

    async def garbage(_: bytes) -> tuple[bytes, bool]:
        return b"SSH-2.0-OpenSSH\r\n\r\n", True

    async def cut_short(_: bytes) -> tuple[bytes, bool]:
        return b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part", True

    async def go() -> None:
        p = pool(read_timeout=0.3)
        with pytest.raises(ConnectFailed):
            await p.request(origin(free_port()), "POST", "/x", b"{}")
        for answer, error in ((hang, ReadTimeout), (garbage, BadResponse), (cut_short, BrokenOff)):
            engine = Engine(answer)
            o = origin(await engine.start())
            with pytest.raises(error):
                r = await p.request(o, "POST", "/x", b"{}")
                await r.read(LIMIT)
            await engine.stop()
        # Every failure gave its slot back: a pool of 8 still has room for 8.
        engine = Engine(echo)
        o = origin(await engine.start())
        responses = [await p.request(o, "POST", "/x", b"z") for _ in range(8)]
        assert [await r.read(LIMIT) for r in responses] == [b"z"] * 8
        await p.close()
        await engine.stop()

    asyncio.run(go())


def test_closing_an_unfinished_answer_drops_the_connection() -> None:
    async def endless(_: bytes) -> tuple[bytes, bool]:
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n", False

    async def go() -> None:
        engine = Engine(endless)
        o = origin(await engine.start())
        p = pool()
        r = await p.request(o, "POST", "/x", b"{}")
        async for chunk in r.chunks():
            assert chunk == b"hello"
            break
        r.close()
        await asyncio.sleep(0.1)
        assert engine.open == 0, "the engine saw its client go"
        await p.close()
        await engine.stop()

    asyncio.run(go())


def test_a_large_answer_read_slowly_arrives_intact() -> None:
    """Past the high-water mark the client stops reading from the socket until
    the caller catches up; every byte still arrives, in order."""
    payload = bytes(range(256)) * 8192  # 2 MiB

    async def big(_: bytes) -> tuple[bytes, bool]:
        return ok(payload), False

    async def go() -> None:
        engine = Engine(big)
        o = origin(await engine.start())
        p = pool()
        r = await p.request(o, "POST", "/x", b"{}")
        got = bytearray()
        async for chunk in r.chunks():
            got += chunk
            await asyncio.sleep(0.001)
        assert bytes(got) == payload
        await p.close()
        await engine.stop()

    asyncio.run(go())


def test_https_to_the_engine_verifies_its_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def go() -> bytes:
        engine = Engine(echo)
        o = origin(await engine.start(server_tls), "https")
        p = pool()
        try:
            return await (await p.request(o, "POST", "/x", b"secret")).read(LIMIT)
        finally:
            await p.close()
            await engine.stop()

    with pytest.raises(ConnectFailed):  # not signed by a CA this machine trusts
        asyncio.run(go())
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the default context's trust store
    assert asyncio.run(go()) == b"secret"

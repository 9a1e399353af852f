"""HTTP/1.1 to the engines: a pool of keep-alive connections on asyncio,
responses parsed by httptools (the C parser uvicorn uses for the gateway's own
side).

Why not aiohttp, which the forwarder used before: the forwarder sits on every
call's path, and with a fixed peer (our own engine, speaking HTTP/1.1 with
length- or chunk-delimited bodies) a connection needs no more than one write
per request and one parser. Measured on this machine, a keep-alive call costs
0.06 ms of client CPU here against 0.22 ms with aiohttp, which also starts a
task per request to write its body (bench/engine_client.py).

What this client does not do, because the engine never needs it: redirects,
cookies, proxies, compression, bodies delimited by the connection closing
(such an answer counts as broken off), HTTP/2.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from engine.address import NEEDS_GROUP, socket_path

# A streamed answer's unread bytes past this stop reading from the engine until
# the caller catches up (TCP then slows the engine down).
_HIGH_WATER = 256 * 1024


class TransportError(Exception):
    """The engine could not be reached, or its answer did not arrive whole."""


class ConnectFailed(TransportError):
    pass


class ConnectTimeout(TransportError):
    pass


class ReadTimeout(TransportError):
    pass


class BrokenOff(TransportError):
    """The connection closed before the answer was complete."""


class BadResponse(TransportError):
    """The engine's bytes are not an HTTP/1.1 response."""


class TooLarge(TransportError):
    """The answer (or one event of a stream) is over what the gateway holds in memory for one call."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one engine listens, and the start of every request sent to it."""

    scheme: str
    host: str
    port: int
    base_path: str
    # Sent on every request: host, the engine's key, the content type.
    header_lines: bytes
    # The engine's Unix socket, for a `unix:/path` URL (engine/address.py).
    unix_path: str | None = None

    @classmethod
    def of(cls, base_url: str, headers: dict[str, str]) -> Origin:
        unix_path = socket_path(base_url)
        if unix_path is not None:
            lines = {"host": "localhost", **headers}
            return cls("unix", "localhost", 0, "", _header_lines(lines), unix_path)
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an engine URL is http://host:port, https://host:port or unix:/path, not {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        lines = {"host": f"{host}:{port}", **headers}
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), _header_lines(lines))

    def request(self, method: str, path: str, body: bytes, request_id: str | None = None) -> bytes:
        """The whole request, head and body, to be sent in one write."""
        start = f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode("latin-1")
        if request_id is not None:
            start += b"x-request-id: %s\r\n" % request_id.encode("ascii")
        return b"%s%scontent-length: %d\r\n\r\n%s" % (start, self.header_lines, len(body), body)


def _header_lines(headers: dict[str, str]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")


class _Connection(asyncio.Protocol):
    """One connection to an engine, carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float):
        self._loop = loop
        self._read_timeout = read_timeout
        # The parser calls back into this object, and the transport holds it:
        # both exist only while connected, so a closed connection is freed by
        # reference counting (no cycle; tests/test_cyclic_garbage.py).
        self._parser: httptools.HttpResponseParser | None = None
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        # What went wrong, as a type: an exception object held here would hold
        # the frames of its traceback, and they this connection (a cycle).
        self._failure: type[TransportError] | None = None
        self._why = ""

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no subclass)
        self._parser = httptools.HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            return  # aborted: what is still in flight is dropped
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse, f"unparsable answer: {exc}")
            self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._parser = None
        if not self.complete:
            self._fail(BrokenOff, "the engine closed the connection before its answer was complete")

    # -- httptools callbacks

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # -- the request's side

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._reset()
        self._transport.write(data)

    async def wait(self) -> None:
        """Until the next thing arrives (headers, body, the end), or raise what went wrong."""
        if self._failure is None:
            self._waiter = self._loop.create_future()
            timer = self._loop.call_later(self._read_timeout, self._time_out, self._waiter)
            try:
                await self._waiter
            finally:
                self._waiter = None
                timer.cancel()
        if self._failure is not None:
            raise self._failure(self._why)

    def take(self) -> bytes:
        """The body bytes that have arrived and not been taken yet."""
        data = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    @property
    def has_data(self) -> bool:
        return bool(self._chunks)

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and not self._chunks

    def abort(self) -> None:
        """Drop the connection at once (the engine sees its client go and stops working)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, failure: type[TransportError], why: str) -> None:
        if self._failure is None:
            self._failure, self._why = failure, why
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _time_out(self, waiter: asyncio.Future[None]) -> None:
        if waiter is self._waiter:
            self._fail(ReadTimeout, f"no data from the engine for {self._read_timeout:g} s")
            self.abort()


class Response:
    """An engine's answer: its status is in; its body is read with `read` or `chunks`."""

    __slots__ = ("_conn", "_done", "_origin", "_pool", "status")

    def __init__(self, conn: _Connection, pool: EnginePool, origin: Origin):
        self.status = conn.status
        self._conn = conn
        self._pool = pool
        self._origin = origin
        self._done = False

    async def read(self, limit: int) -> bytes:
        """The whole body; TooLarge (and the connection dropped) past `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                self.close()
                raise TooLarge(f"the engine's answer is over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        conn = self._conn
        try:
            while True:
                if conn.has_data:
                    yield conn.take()
                elif conn.complete:
                    break
                else:
                    await conn.wait()
        except BaseException:
            self.close()
            raise
        self._finish(reuse=True)

    def close(self) -> None:
        """Let the connection go: back to the pool if the answer was read whole, else dropped."""
        self._finish(reuse=False)

    def _finish(self, *, reuse: bool) -> None:
        if not self._done:
            self._done = True
            self._pool._release(self._origin, self._conn, reuse=reuse)


class EnginePool:
    """Keep-alive connections to the engines, at most `size` in use or idle."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, size: int, keepalive: float):
        # `keepalive` must stay below the engine's own idle timeout (vLLM: 5 s), or
        # a call can go out on a connection the engine is closing: a 502 for nothing.
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive
        self._slots = asyncio.Semaphore(size)
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def request(
        self, origin: Origin, method: str, path: str, body: bytes = b"", request_id: str | None = None
    ) -> Response:
        """Send a request; return once the answer's status line and headers are in."""
        await self._slots.acquire()
        conn: _Connection | None = None
        try:
            conn = self._take_idle(origin) or await self._connect(origin)
            conn.send(origin.request(method, path, body, request_id))
            while not conn.headers_done:
                await conn.wait()
        except BaseException:
            if conn is not None:
                conn.abort()
            self._slots.release()
            raise
        return Response(conn, self, origin)

    async def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().abort()

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the others may then expire
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn
            conn.abort()
        return None

    def _release(self, origin: Origin, conn: _Connection, *, reuse: bool) -> None:
        """A request's slot back; its connection kept idle if `reuse` and it can carry another, else dropped."""
        if reuse and conn.reusable:
            now = time.monotonic()
            conn.idle_since = now
            idle = self._idle.setdefault(origin, deque())
            # Close the oldest idle connection once it has outlived the keep-alive.
            if idle and (idle[0].closed or now - idle[0].idle_since >= self._keepalive):
                idle.popleft().abort()
            idle.append(conn)
        else:
            conn.abort()
        self._slots.release()

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.scheme == "https":
            self._tls = self._tls or ssl.create_default_context()
            tls = self._tls

        def made() -> _Connection:
            return _Connection(loop, self._read_timeout)

        try:
            async with asyncio.timeout(self._connect_timeout):
                if origin.unix_path is not None:
                    _, conn = await loop.create_unix_connection(made, origin.unix_path)
                else:
                    _, conn = await loop.create_connection(
                        made, origin.host, origin.port, ssl=tls, server_hostname=origin.host if tls else None
                    )
        except TimeoutError:
            raise ConnectTimeout(f"no connection to the engine within {self._connect_timeout:g} s") from None
        except OSError as exc:
            if isinstance(exc, PermissionError) and origin.unix_path is not None:
                # Only the socket's group may open it (docs/deploy.md).
                raise ConnectFailed(
                    f"cannot connect to the engine: permission denied on {origin.unix_path}; {NEEDS_GROUP}"
                ) from None
            raise ConnectFailed(f"cannot connect to the engine: {exc.strerror or exc}") from None
        return conn

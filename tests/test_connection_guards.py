"""What a client cannot do to the gateway's connections: trickle a body, keep a
connection open by trickling a body after its answer, leave a stream unread,
or open connections without end; and what a refused client still gets: its
answer, not a reset. Each is a real client socket against a
real gateway; the engines are real sockets that never answer, or never stop."""

from __future__ import annotations

import json
import socket
import time

import httpx

from gateway.connection_limits import SUMMARY_SECONDS
from gateway.http_protocol import MAX_HEAD_BYTES
from tests.conftest import GatewayFactory
from tests.support import EngineRef, SocketDouble, exchange

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _post_head(key: str, length: int, *, path: str = "/v1/chat/completions") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    ).encode()


def _health(conn: socket.socket) -> bytes:
    conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    return conn.recv(65536)


# The gateway counts a connection until its event loop has handled the close, a
# moment after the client closed it. On a slow host that moment was long enough
# for a test's next connection to be one too many (CI: the gateway still held the
# startup probe's connection when the test's first one came). So these tests make
# the connections they count with `_held`, and close them with `_closed`.


def _held(port: int) -> socket.socket:
    """A connection the gateway serves: one refused as one too many is tried
    again while connections closed before it are still being let go."""
    deadline = time.monotonic() + 5
    while True:
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        answer = _health(conn)
        if answer.startswith(b"HTTP/1.1 200"):
            return conn
        conn.close()
        assert b"too_many_connections" in answer and time.monotonic() < deadline, answer
        time.sleep(0.1)


def _closed(conn: socket.socket) -> None:
    """Close `conn` once the gateway has let it go: it answers our end with its
    own, and sends that only after it has stopped counting the connection."""
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536):
        pass
    conn.close()


def test_a_body_must_arrive_in_time(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    """A body that stops short is answered 408 once `body_timeout_seconds` have
    passed, audited with its caller; the engine never sees it."""
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"body_timeout_seconds": 1.0})
    key = gw.create_key()
    body = json.dumps(CHAT).encode()
    t0 = time.monotonic()
    status, headers, answer = exchange(gw.port, _post_head(key, len(body)) + body[:10])
    assert status == 408 and 0.9 < time.monotonic() - t0 < 5
    assert headers["connection"] == "close"
    assert json.loads(answer)["error"]["code"] == "request_timeout"
    final = gw.final(headers["x-request-id"])
    assert (final["http_status"], final["error_type"]) == (408, "body_timeout")
    assert final["key_id"] == key.split("_")[1]
    assert tripwire.calls == 0


def test_a_body_trickled_after_its_answer_does_not_hold_the_connection(
    make_gateway: GatewayFactory, tripwire: SocketDouble
) -> None:
    """A refusal that needs no body (a bad key) is answered at once. The body's
    rest is read and dropped, so the client gets the answer, not a reset; a
    body still trickling `body_timeout_seconds` later loses its connection.
    A body that does finish leaves the connection reusable."""
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"body_timeout_seconds": 1.0})
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        conn.sendall(_post_head("bst_nope_nope", 1000) + b"{")
        first = conn.recv(65536)
        assert first.startswith(b"HTTP/1.1 401")
        t0 = time.monotonic()
        closed = False
        for _ in range(100):  # a byte every 50 ms: far slower than the limit allows
            try:
                conn.sendall(b" ")
                time.sleep(0.05)
            except OSError:
                closed = True
                break
            conn.setblocking(False)
            try:
                if conn.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            finally:
                conn.setblocking(True)
        assert closed and 0.9 < time.monotonic() - t0 < 4

    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        conn.sendall(_post_head("bst_nope_nope", 3) + b"{")
        assert conn.recv(65536).startswith(b"HTTP/1.1 401")
        conn.sendall(b" }")  # the rest of the body, after its answer
        time.sleep(1.5)  # past the linger: the body ended, so the connection is kept
        conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_client_that_stops_reading_is_disconnected(make_gateway: GatewayFactory) -> None:
    """A runaway stream to a client that reads nothing: once the socket has been
    full for `send_timeout_seconds`, the gateway drops the client and the
    engine, and records the call as client_closed."""
    flood = SocketDouble("flood")
    try:
        gw = make_gateway(engines=[EngineRef("m", flood.url, "k")], gateway={"send_timeout_seconds": 1.0})
        key = gw.create_key()
        body = json.dumps({**CHAT, "stream": True}).encode()
        conn = socket.socket()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills quickly
        conn.settimeout(10)
        conn.connect(("127.0.0.1", gw.port))
        with conn:
            conn.sendall(_post_head(key, len(body)) + body)
            head = conn.recv(4096)
            assert head.startswith(b"HTTP/1.1 200")
            request_id = next(
                line.split(b":", 1)[1].strip().decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"x-request-id:")
            )
            time.sleep(4)  # reads nothing: the socket fills, the gateway waits, then gives up
            received, t0 = 0, time.monotonic()
            try:
                while chunk := conn.recv(1 << 20):
                    received += len(chunk)
                    assert time.monotonic() - t0 < 10, "the stream never ended"
            except ConnectionResetError:
                pass
        final = gw.final(request_id)
        assert final["outcome"] == "client_closed"
        # What was in flight when it stopped, and no more: the engine was dropped too.
        assert received < 16 << 20
    finally:
        flood.close()


def test_connections_are_capped_per_client_and_in_all(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    """One connection too many is answered 503 at its first request, audited;
    once one closes, a new one is served. A trusted proxy is capped only in all."""
    gw = make_gateway(
        engines=[EngineRef("m", tripwire.url, "k")],
        gateway={"max_connections_per_client": 2, "max_connections": 3},
    )
    held = [_held(gw.port) for _ in range(2)]
    status, headers, body = exchange(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert status == 503 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    final = gw.final(headers["x-request-id"])
    assert (final["http_status"], final["error_type"], final["client_addr"]) == (
        503,
        "too_many_client_connections",
        "127.0.0.1",
    )
    # One too many that sends nothing is closed long before the head's timeout (30 s).
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as idle:
        t0 = time.monotonic()
        assert idle.recv(100) == b"" and time.monotonic() - t0 < 3
    socket.create_connection(("127.0.0.1", gw.port), timeout=10).close()  # one that leaves at once
    _closed(held.pop())
    assert httpx.get(gw.url + "/healthz").status_code == 200
    for c in held:
        c.close()

    proxied = make_gateway(
        engines=[EngineRef("m", tripwire.url, "k")],
        gateway={"max_connections_per_client": 1, "max_connections": 3, "trusted_proxies": ["127.0.0.1/32"]},
    )
    held = [_held(proxied.port) for _ in range(3)]
    status, headers, _ = exchange(proxied.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert status == 503 and proxied.final(headers["x-request-id"])["error_type"] == "too_many_connections"
    for c in held:
        c.close()

    # The two that sent nothing have no audit record (no request); they are
    # counted into one summary line, SUMMARY_SECONDS after the first.
    deadline = time.monotonic() + SUMMARY_SECONDS + 5
    while (
        not (silent := [e for e in gw.log_events() if e["event"] == "http.turned_away_silent"])
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert [(e["count"], e["clients"]) for e in silent] == [(2, {"127.0.0.1": 2})]


def test_silent_turn_aways_are_logged_when_the_gateway_stops(
    make_gateway: GatewayFactory, tripwire: SocketDouble
) -> None:
    """A connection over the caps that sends nothing, then a shutdown long
    before the summary line is due: the count is logged by the app's shutdown."""
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"max_connections_per_client": 1})
    with _held(gw.port), socket.create_connection(("127.0.0.1", gw.port), timeout=10) as silent:
        assert silent.recv(100) == b""  # closed unanswered
    t0 = time.monotonic()
    gw.stop()
    assert time.monotonic() - t0 < SUMMARY_SECONDS / 2
    lines = [e for e in gw.log_events() if e["event"] == "http.turned_away_silent"]
    assert [(e["count"], e["clients"]) for e in lines] == [(1, {"127.0.0.1": 1})]
    assert lines[0]["seconds"] < SUMMARY_SECONDS


def test_a_refused_client_still_sending_gets_its_answer(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    """A request refused before the app sees it (over the caps, a head too
    large) is answered and the rest of what the client sends is read and
    dropped, so a client that writes its whole request before reading gets the
    answer, not a reset. One that never stops sending is closed when the
    linger is up (`body_timeout_seconds`; TURNED_AWAY_SECONDS over the caps)."""
    gw = make_gateway(
        engines=[EngineRef("m", tripwire.url, "k")],
        gateway={"max_connections_per_client": 1, "body_timeout_seconds": 1.0},
    )

    def send_all_then_read(*parts: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
            for part in parts:
                conn.sendall(part)  # a reset would raise here
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        return answer

    held = _held(gw.port)
    mib = b"x" * (1 << 20)
    answer = send_all_then_read(_post_head("bst_nope_nope", 16 << 20), *[mib] * 16)
    assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
    _closed(held)

    big_head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: "
    answer = send_all_then_read(big_head, *[mib] * 8)
    assert answer.startswith(b"HTTP/1.1 431")

    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        conn.sendall(big_head + b"a" * (MAX_HEAD_BYTES + 1))
        t0, closed = time.monotonic(), False
        while not closed and time.monotonic() - t0 < 10:
            try:
                conn.sendall(b"a" * 1024)
                time.sleep(0.05)
            except OSError:
                closed = True
        assert closed and 0.9 < time.monotonic() - t0 < 4

"""TLS when given a certificate; JSON logs with request ids and no secrets."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.support import EngineRef, SocketDouble, self_signed


def test_gateway_serves_tls_with_a_certificate(
    make_gateway: GatewayFactory, tripwire: SocketDouble, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"tls_cert": str(cert), "tls_key": str(key)})
    assert gw.url.startswith("https://")
    api_key = gw.create_key()
    with httpx.Client(verify=gw.verify) as http_client:
        models = gw.client(api_key, http_client=http_client).models.list()
    assert [m.id for m in models] == ["m"]
    # Plain HTTP on the TLS port gets no answer; an untrusting client refuses the certificate.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=2).raise_for_status()
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.url + "/healthz", timeout=2)
    # A refusal before the app over TLS, which cannot shut one side of the
    # connection: the answer still arrives whole while the client sends on.
    context = gw.verify
    assert isinstance(context, ssl.SSLContext)
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
        for _ in range(16):
            conn.sendall(b"a" * (1 << 20))  # a reset would raise here
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            answer += conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431") and b"request_header_fields_too_large" in answer


def test_logs_are_json_with_request_ids_and_no_secrets(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"engine_read_timeout": 0.5})
    key = gw.create_key()
    prompt = "my account number is 4111-SECRET-PROMPT"
    r = gw.post("/v1/chat/completions", key=key, json={"model": "m", "messages": [{"role": "user", "content": prompt}]})
    wrong = gw.post("/v1/chat/completions", json={}, headers={"authorization": "Bearer bst_abcdefabcdef_" + "Z" * 43})
    gw.stop()
    text = gw.log_path.read_text()
    # Every line is JSON, the server's own lines (start, shutdown) included.
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any(line.get("logger", "").startswith("uvicorn") for line in lines)
    calls = {line["request_id"]: line for line in lines if line.get("event") == "call"}
    assert r.headers["x-request-id"] in calls and wrong.headers["x-request-id"] in calls
    assert calls[r.headers["x-request-id"]]["status"] == 504
    assert key not in text and key.split("_", 2)[2] not in text
    assert "SECRET-PROMPT" not in text and "Z" * 43 not in text


def test_third_party_errors_are_logged_with_their_traceback() -> None:
    # A library logging through stdlib `logging` (uvicorn, asyncio, alembic)
    # gets the same JSON as our own lines, and an exception's traceback as
    # text: an operator reading a 500's log line needs the frames.
    script = (
        "import logging\n"
        "from gateway import logs\n"
        "logs.configure('info')\n"
        "try:\n"
        "    {}['missing_engine']\n"
        "except KeyError:\n"
        "    logging.getLogger('uvicorn.error').exception('Exception in ASGI application')\n"
        "logging.getLogger('alembic').info('%s then %s', 'a', b'b')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    error, info = (json.loads(line) for line in done.stderr.splitlines())
    assert error["logger"] == "uvicorn.error" and error["level"] == "error"
    assert error["exception"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing_engine'" in error["exception"] and "exc_info" not in error
    assert info == {"event": "a then b'b'", "level": "info", "timestamp": info["timestamp"], "logger": "alembic"}

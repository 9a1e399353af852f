"""Streaming fidelity against the real engine: a client that goes away cancels
the engine's work (seen in the engine's own /metrics) and leaves an audit row."""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.conftest import GatewayFactory
from tests.support import EngineRef, engine_metric

pytestmark = pytest.mark.engine


def test_a_client_that_disconnects_mid_stream_aborts_the_engine_request(
    make_gateway: GatewayFactory, vllm_engine: EngineRef
) -> None:
    gw = make_gateway(engines=[vllm_engine])
    key = gw.create_key()
    before = engine_metric(vllm_engine, "vllm:generation_tokens_total")
    # A long answer (ignore_eos: the model does not get to stop early), read for a few events, then dropped.
    body = (
        b'{"model":"tiny","messages":[{"role":"user","content":"Count"}],"max_tokens":480,'
        b'"ignore_eos":true,"stream":true}'
    )
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    received = b""
    with socket.create_connection(("127.0.0.1", gw.port)) as conn:
        conn.sendall(request)
        while received.count(b"data: {") < 4:
            chunk = conn.recv(4096)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    request_id = re.search(rb"x-request-id: ([0-9a-f]+)", received)
    assert request_id is not None
    # The socket is closed here, long before 480 tokens are made.
    final = gw.final(request_id.group(1).decode())
    assert final["outcome"] == "client_closed" and final["http_status"] == 200
    # The engine stopped: nothing running, and far fewer than 480 tokens made. (This
    # vLLM does not count client aborts in request_success{finished_reason="abort"}.)
    deadline = time.monotonic() + 10
    while engine_metric(vllm_engine, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the engine kept generating"
        time.sleep(0.1)
    time.sleep(0.5)
    made = engine_metric(vllm_engine, "vllm:generation_tokens_total") - before
    assert 3 <= made < 480, made

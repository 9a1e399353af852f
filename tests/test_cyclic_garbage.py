"""Calls leave no cyclic garbage in the gateway.

The gateway runs Python's cycle collector rarely (`gateway.app.GC_THRESHOLDS`):
at CPython's default thresholds it walked every call in flight many times a
second, for nothing. That is only safe while calls free what they make by
reference counting alone; garbage in cycles would wait for a rare collection
(and hold whatever it points to, request bodies included). So every kind of
call below, answered or refused, runs many times against a real gateway and
vLLM engine, and a full collection afterwards must find (almost) nothing: a
cycle made per call would be at least two objects per call.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway, free_port

pytestmark = pytest.mark.engine

WITNESS = Path(__file__).with_name("gc_witness")
CALLS = 20  # of each kind
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def _collect(gw: Gateway, out: Path) -> dict[str, object]:
    """A full collection in the gateway (tests/gc_witness): what it found."""
    out.unlink(missing_ok=True)
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not out.exists():
        assert time.monotonic() < deadline, "the gateway did not report its collection"
        time.sleep(0.05)
    return json.loads(out.read_text())


def _kinds(gw: Gateway, key: str, client: httpx.Client) -> dict[str, tuple[int | None, Callable[[], int | None]]]:
    """Each kind of call with the status it must get, on one keep-alive
    connection as SDK clients keep them (but one: a new connection per call);
    "quiet" makes no call at all."""
    auth = {"authorization": f"Bearer {key}"}

    def post(body: object, *, headers: dict[str, str] = auth, path: str = "/v1/chat/completions") -> int:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return client.post(path, content=content, headers=headers).status_code

    def stream(close_early: bool) -> int:
        body = {**CHAT, "stream": True, "max_tokens": 8}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
            for line in r.iter_lines():
                if close_early and line.startswith("data: {"):
                    break  # the client goes away mid-stream (httpx closes the connection)
            return r.status_code

    return {
        "quiet": (None, lambda: time.sleep(0.3)),
        "chat": (200, lambda: post(CHAT)),
        "chat on a new connection": (200, lambda: gw.post("/v1/chat/completions", json=CHAT, key=key).status_code),
        "completion": (200, lambda: post({"model": "tiny", "prompt": "Hi", "max_tokens": 4}, path="/v1/completions")),
        "stream": (200, lambda: stream(close_early=False)),
        "stream closed by the client": (200, lambda: stream(close_early=True)),
        "bad key": (401, lambda: post(CHAT, headers={"authorization": "Bearer bst_nope_nope"})),
        "malformed JSON": (400, lambda: post(b'{"model": "tiny", "mess')),
        "wrong types": (400, lambda: post({"model": "tiny", "messages": "hi"})),
        "unknown model": (404, lambda: post({**CHAT, "model": "nope"})),
        "body too large": (413, lambda: post(b"x" * 70_000)),
        "engine down": (503, lambda: post({**CHAT, "model": "gone"})),
    }


def test_calls_of_every_kind_leave_no_cyclic_garbage(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, tmp_path: Path
) -> None:
    gone = EngineRef("gone", f"http://127.0.0.1:{free_port()}", "k")
    gw = make_gateway(engines=[vllm_engine, gone], gateway={"max_body_bytes": 65_536}, start=False)
    out = tmp_path / "gc.json"
    gw.env = {
        "PYTHONPATH": os.pathsep.join([str(WITNESS), os.environ.get("PYTHONPATH", "")]),
        "GC_WITNESS_OUT": str(out),
    }
    gw.start()
    key = gw.create_key()
    found: dict[str, dict[str, object]] = {}
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        for name, (status, call) in _kinds(gw, key, client).items():
            # The first call fills caches and imports lazily: not per call.
            assert call() == status, name
            time.sleep(0.2)  # a stream's audit settles
            _collect(gw, out)
            for _ in range(CALLS):
                assert call() == status, name
            time.sleep(0.2)
            found[name] = _collect(gw, out)
    # "quiet" is no call at all: what the process makes meanwhile (a few
    # dozen objects, the same whatever ran before) is not per call.
    floor = found.pop("quiet")["collected"]
    assert isinstance(floor, int) and floor < CALLS * 2, found
    leaky = {name: f for name, f in found.items() if f["collected"] - floor >= CALLS}  # type: ignore[operator]
    assert not leaky, f"cyclic garbage after {CALLS} calls of each kind: {leaky}"

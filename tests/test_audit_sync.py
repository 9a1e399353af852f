"""When the gateway's audit writer syncs to disk, counted on the real process.

Strict mode commits a call's intent record before the engine sees the call.
A non-streamed call's intent is not synced on its own: its final record's
sync, before the answer is released, takes it to disk. A stream releases
content before its final record, so its intent is synced before it is
forwarded. Counted with strace on the gateway's threads: one sync per
non-streamed call, two per stream.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to count the gateway's syncs"),
]

CALLS = 10


def _syncs_during(gw: Gateway, tmp_path: Path, calls: Callable[[], None]) -> int:
    assert gw.proc is not None
    trace = tmp_path / "syncs.txt"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-p", str(gw.proc.pid), "-o", str(trace)]
    )
    try:
        time.sleep(1.0)  # strace attaches to every thread before the first call
        calls()
        time.sleep(0.5)
    finally:
        tracer.terminate()
        tracer.wait(10)
    return sum(1 for line in trace.read_text().splitlines() if "sync(" in line)


@pytest.fixture
def gw(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> Gateway:
    # No checkpoint falls due during the test (each would sync once more).
    return make_gateway(engines=[vllm_engine], audit={"checkpoint_every": 100_000, "checkpoint_seconds": 3600})


def test_a_non_streamed_call_syncs_once_and_a_stream_twice(gw: Gateway, tmp_path: Path) -> None:
    client = gw.client(gw.create_key())
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    client.chat.completions.create(**ask)  # the first call opens the pools

    def answered() -> None:
        for _ in range(CALLS):
            client.chat.completions.create(**ask)

    def streamed() -> None:
        for _ in range(CALLS):
            assert list(client.chat.completions.create(**ask, stream=True))

    once = _syncs_during(gw, tmp_path, answered)
    twice = _syncs_during(gw, tmp_path, streamed)
    assert once == CALLS, f"{CALLS} non-streamed calls synced {once} times"
    assert twice == 2 * CALLS, f"{CALLS} streams synced {twice} times"
    # Every call still has both records, in order.
    finals = [r for r in gw.records() if r["phase"] == "final" and r["route"] == "/v1/chat/completions"]
    assert len(finals) == 2 * CALLS + 1
    assert all([x["phase"] for x in gw.records(r["request_id"])] == ["intent", "final"] for r in finals)

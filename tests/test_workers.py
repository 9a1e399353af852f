"""Several gateway processes on one port (`gateway.workers`): one rate limit
across them, an audit stream each that verifies, and a worker that dies is
replaced while the others keep answering."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path

from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway, bastion, free_port, write_config

SHARED = """\
version: 1
teams:
  shared:
    models: [tiny]
    limits:
      per_team: {requests_per_minute: 6}
  free:
    models: [tiny]
"""


def workers_of(gw: Gateway, count: int, gone: int | None = None, timeout: float = 60) -> list[int]:
    """The live worker processes under the supervisor, once there are `count`
    of them (and `gone` is not one)."""
    assert gw.proc is not None
    deadline = time.monotonic() + timeout
    while True:
        workers = [p for p in _children(gw.proc.pid) if _is_worker(p)]
        if (len(workers) == count and gone not in workers) or time.monotonic() > deadline:
            assert len(workers) == count and gone not in workers, f"expected {count} workers, found {workers}"
            return workers
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _is_worker(pid: int) -> bool:
    """A live gateway worker: not a zombie, not multiprocessing's resource tracker."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return False


def wait_for_boots(gw: Gateway, count: int, timeout: float = 60) -> list[str]:
    """The streams of the `policy.loaded` records, once there are `count`."""
    deadline = time.monotonic() + timeout
    while True:
        booted = [r["stream_id"] for r in gw.records() if r["route"] == "policy.loaded"]
        if len(booted) >= count or time.monotonic() > deadline:
            assert len(booted) == count, booted
            return booted
        time.sleep(0.2)


def chat(gw: Gateway, key: str) -> int:
    # A fresh connection per call, so calls spread over the workers.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}
    return gw.post("/v1/chat/completions", key=key, json=body, headers={"connection": "close"}).status_code


def test_workers_share_one_limit_and_each_writes_a_stream_that_verifies(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, tmp_path: Path
) -> None:
    redis = {"rate_limits": {"backend": "redis", "key_prefix": f"bastion-test-{secrets.token_hex(4)}"}}
    gw = make_gateway(engines=[vllm_engine], gateway={"workers": 2}, policy=SHARED, policy_settings=redis)
    workers_of(gw, 2)
    key = gw.create_key(team="shared")
    statuses = [chat(gw, key) for _ in range(12)]
    assert sorted(statuses) == [200] * 6 + [429] * 6, statuses

    # A worker killed outright is replaced; calls are answered meanwhile by the other.
    first, second = workers_of(gw, 2)
    os.kill(first, signal.SIGKILL)
    other = gw.create_key(name="other", team="free")
    assert all(chat(gw, other) == 200 for _ in range(4))
    assert second in workers_of(gw, 2, gone=first)
    # Each worker records the policy it booted with, in a stream of its own:
    # the two first workers, then the replacement once it has started.
    booted = wait_for_boots(gw, 3)
    assert len(set(booted)) == 3, booted

    gw.stop()
    records = gw.records()
    report = json.loads(gw.bastion("audit", "verify", "--json", check=False).stdout)
    assert report["records"] == len(records)
    # Nothing modified or missing; the killed worker's stream is the one left without its closing record.
    assert report["intact"] and all(s["intact"] for s in report["streams"]), report
    assert [s["closed"] for s in report["streams"]].count(False) == 1, report


def test_workers_with_limits_held_in_memory_are_refused(tmp_path: Path, vllm_engine: EngineRef) -> None:
    config = write_config(
        tmp_path / "gw",
        port=free_port(),
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'gw' / 'bastion.db'}",
        engines=[vllm_engine],
        gateway={"workers": 3},
    )
    out = bastion("serve", "--config", str(config), check=False, timeout=30)
    assert out.returncode == 2
    assert 'gateway.workers = 3 needs policy.rate_limits.backend = "redis"' in out.stderr

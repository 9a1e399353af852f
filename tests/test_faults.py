"""Faults made by real processes and sockets: an engine that is down, too slow,
or breaks off mid-stream; an audit store that refuses writes. Each ends in an
OpenAI-shaped error; the audit store faults end with the engine never called."""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import re
import resource
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.forward import error_of, usage_of
from tests.conftest import GatewayFactory
from tests.support import BASTION, EngineRef, Gateway, SocketDouble, TcpProxy, fetch_records, free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_engine_down_is_503_and_audited(make_gateway: GatewayFactory) -> None:
    engine_url = f"http://127.0.0.1:{free_port()}"
    gw = make_gateway(engines=[EngineRef("m", engine_url, "k")])
    key = gw.create_key()
    r = gw.post("/v1/chat/completions", json=CHAT, key=key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    records = gw.records(r.headers["x-request-id"])
    assert [x["phase"] for x in records] == ["intent", "final"]
    assert records[1]["error_type"] == "engine_connect_failed" and records[1]["outcome"] == "error"
    for _ in range(3):
        ready = httpx.get(gw.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["engines"] == {"m": "unhealthy"}
    # The caller hears only that the engine is unavailable; the log says why, for the
    # call, and once for readyz however often it is asked, until the engine is back.
    failed = [x for x in gw.log_events() if x["event"] == "engine.transport_error"]
    assert [x["request_id"] for x in failed] == [r.headers["x-request-id"]]
    assert failed[0]["reason"] == "cannot connect to the engine: Connection refused"
    unhealthy = [x for x in gw.log_events() if x["event"] == "engine.unhealthy"]
    assert [(x["engine_url"], x["reason"]) for x in unhealthy] == [
        (engine_url, "cannot connect to the engine: Connection refused")
    ]
    with _healthy_engine_at(int(engine_url.rsplit(":", 1)[1])):
        assert gw.readiness(lambda checks: checks["engines"] == {"m": "healthy"}).status_code == 200
    assert [x["engine_url"] for x in gw.log_events() if x["event"] == "engine.healthy"] == [engine_url]


def test_readyz_asked_without_end_probes_at_most_once_a_second(make_gateway: GatewayFactory) -> None:
    """/readyz takes no credential, and each answer probed every engine and
    wrote a heartbeat to the audit store: a flood of it (670 a second here)
    cut audited calls to a third."""
    engine = SocketDouble("usage")  # answers /health with 200
    try:
        gw = make_gateway(engines=[EngineRef("m", engine.url, "k")])

        def probes() -> int:
            return sum(1 for line in engine.request_lines if line.startswith(b"GET /health"))

        before, started = probes(), time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: httpx.get(gw.url + "/readyz", timeout=10), range(300)))
        elapsed = time.monotonic() - started
        assert {r.status_code for r in answers} == {200}
        assert {r.json()["checks"]["audit_store"] for r in answers} == {"writable"}
        # One run a second at most (and the one in flight when the burst began).
        assert probes() - before <= elapsed + 2, (probes() - before, elapsed)
    finally:
        engine.close()


@contextmanager
def _healthy_engine_at(port: int) -> Iterator[None]:
    """A listener that answers vLLM's /health with 200, and nothing else."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def test_engine_too_slow_is_504_and_audited(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"engine_read_timeout": 1.0})
    key = gw.create_key()
    r = gw.post("/v1/chat/completions", json=CHAT, key=key)
    assert r.status_code == 504 and r.json()["error"]["code"] == "engine_timeout"
    final = gw.final(r.headers["x-request-id"])
    assert final["http_status"] == 504 and final["error_type"] == "engine_read_timeout"
    assert tripwire.calls == 1


def test_engine_closing_without_an_answer_is_502_and_audited(make_gateway: GatewayFactory) -> None:
    closer = SocketDouble("close")
    try:
        gw = make_gateway(engines=[EngineRef("m", closer.url, "k")])
        r = gw.post("/v1/chat/completions", json=CHAT, key=gw.create_key())
        assert r.status_code == 502 and r.json()["error"]["code"] == "engine_error"
        final = gw.final(r.headers["x-request-id"])
        assert final["outcome"] == "error" and final["error_type"].startswith("engine_")
        assert closer.calls == 1
    finally:
        closer.close()


def stream(gw: Gateway, key: str) -> tuple[list[bytes], str]:
    """A streamed call's events and request id."""
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={**CHAT, "stream": True},
        headers={"authorization": f"Bearer {key}"}, timeout=10,
    ) as r:  # fmt: skip
        return [e for e in r.read().split(b"\n\n") if e], r.headers["x-request-id"]


def test_engine_breaking_off_mid_stream_gives_an_error_event_and_audit(make_gateway: GatewayFactory) -> None:
    broken = SocketDouble("break")
    try:
        gw = make_gateway(engines=[EngineRef("m", broken.url, "k")])
        events, request_id = stream(gw, gw.create_key())
        assert events[0].startswith(b'data: {"id":"x"')
        assert b'"code":"engine_error"' in events[-1]
        final = gw.final(request_id)
        assert final["outcome"] == "error" and final["error_type"].startswith("engine_")
    finally:
        broken.close()


@pytest.mark.parametrize(
    ("mode", "limits", "reason"),
    [
        # A runaway engine streams 16 KB events without end. Read whole (not
        # streamed), the answer grew in the gateway's memory until the read
        # time-out, which never came since bytes kept arriving.
        ("flood", {"engine_max_answer_bytes": 8192}, "engine_answer_too_large"),
        # A usage event or a body with reasoning that does not decode (the
        # gateway reads both) was a 500 "internal error" (not streamed), or
        # broke the stream off with a `client_closed` record blaming the client.
        ("garbled", {}, "engine_bad_answer"),
    ],
)
def test_an_engine_answer_the_gateway_cannot_take_is_502_or_an_error_event(
    make_gateway: GatewayFactory, mode: str, limits: dict[str, int], reason: str
) -> None:
    engine = SocketDouble(mode)
    try:
        gw = make_gateway(engines=[EngineRef("m", engine.url, "k")], gateway=limits)
        key = gw.create_key()
        r = gw.post("/v1/chat/completions", json=CHAT, key=key)
        assert r.status_code == 502 and r.json()["error"]["code"] == "engine_error", r.text
        final = gw.final(r.headers["x-request-id"])
        assert (final["outcome"], final["error_type"]) == ("error", reason)
        # Streamed, the stream ends with the error as its only event.
        events, request_id = stream(gw, key)
        assert len(events) == 1 and b'"code":"engine_error"' in events[0], events
        final = gw.final(request_id)
        assert (final["outcome"], final["error_type"]) == ("error", reason)
    finally:
        engine.close()


@pytest.mark.postgres
@pytest.mark.parametrize("usage", [b'{"prompt_tokens":5000000000,"completion_tokens":1}', b'{"prompt_tokens":-900}'])
def test_token_counts_no_engine_could_report_are_not_recorded(
    make_gateway: GatewayFactory, fresh_pg_url: str, usage: bytes
) -> None:
    """The engine's usage is untrusted input. A count past PostgreSQL's integer
    failed the writer's whole batch: this call's final record was lost (503
    after the engine had answered), and every call committed with it was
    refused. A negative count went into the trail as is, and refunded the
    caller's token budget."""
    engine = SocketDouble("usage")
    engine.usage = usage
    try:
        gw = make_gateway(engines=[EngineRef("m", engine.url, "k")], database_url=fresh_pg_url)
        key = gw.create_key()
        r = gw.post("/v1/chat/completions", json=CHAT, key=key)
        assert r.status_code == 200, r.text
        final = gw.final(r.headers["x-request-id"])
        assert (final["outcome"], final["prompt_tokens"], final["completion_tokens"]) == ("ok", None, None)
        # Streamed, the usage event is read to count tokens: the stream ends
        # with an error event, as for any engine answer the gateway cannot read.
        events, request_id = stream(gw, key)
        assert b'"code":"engine_error"' in events[-1], events
        final = gw.final(request_id)
        assert (final["outcome"], final["error_type"], final["prompt_tokens"]) == ("error", "engine_bad_answer", None)
    finally:
        engine.close()


def test_a_stream_the_engine_ends_with_an_error_is_recorded_as_an_error(make_gateway: GatewayFactory) -> None:
    """vLLM reports a generation that fails after the stream's 200 as an
    `error` event, then `[DONE]`. The record said `ok`: an answered call."""
    failing = SocketDouble("fails")
    try:
        gw = make_gateway(engines=[EngineRef("m", failing.url, "k")])
        events, request_id = stream(gw, gw.create_key())
        assert (
            events[1].startswith(b'data: {"error": {"message": "Internal server error"')
            and events[2] == b"data: [DONE]"
        )
        final = gw.final(request_id)
        assert (final["outcome"], final["http_status"]) == ("error", 200)
        assert final["error_type"] == "engine:InternalServerError", final
    finally:
        failing.close()


def test_engine_json_nested_past_the_parser_s_limit_is_read_as_no_usage() -> None:
    deep = b'{"x": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    assert usage_of(deep) is None and error_of(deep) == ("engine_error", "")


# ----------------------------------------------------------- audit store faults


def _assert_refused_without_engine(gw: Gateway, key: str, engine: SocketDouble) -> None:
    r = gw.post("/v1/chat/completions", json=CHAT, key=key)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "audit_unavailable"
    assert engine.calls == 0, "the engine saw a call that was never audited"
    ready = gw.readiness(lambda checks: checks["audit_store"] == "unwritable")
    assert ready.status_code == 503 and ready.json()["checks"]["audit_store"] == "unwritable"


def _assert_reaches_engine(gw: Gateway, key: str, engine: SocketDouble) -> None:
    """The control: with the store back, the same call is audited and forwarded."""
    r = gw.post("/v1/chat/completions", json=CHAT, key=key)
    assert r.status_code == 504  # the hanging engine was reached
    assert engine.calls == 1
    assert gw.final(r.headers["x-request-id"])["http_status"] == 504


@contextmanager
def sqlite_write_lock(db_path: str) -> Iterator[None]:
    """Another process takes SQLite's write lock and keeps it."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3,sys\n"
         f"c=sqlite3.connect({db_path!r}, isolation_level=None)\n"
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        yield
    finally:
        holder.terminate()
        holder.wait()


class _StreamReader:
    """Reads a streamed call on a thread of its own, noting when the stream's end arrived."""

    def __init__(self, gw: Gateway, key: str):
        self._gw, self._key = gw, key
        self.first_event = threading.Event()
        self.body = b""
        self.request_id = ""
        self.ended_at = 0.0
        self.records_at_end: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with httpx.stream(
            "POST", self._gw.url + "/v1/chat/completions", json={**CHAT, "stream": True},
            headers={"authorization": f"Bearer {self._key}"}, timeout=30,
        ) as r:  # fmt: skip
            self.request_id = r.headers["x-request-id"]
            for piece in r.iter_raw():
                self.body += piece
                self.first_event.set()
        self.ended_at = time.monotonic()
        # Read the moment the client has the whole stream: nothing waited for.
        self.records_at_end = self._gw.records(self.request_id)

    def join(self) -> None:
        self._thread.join(30)
        assert not self._thread.is_alive(), "the stream never ended"


@contextmanager
def _gated_stream(
    make_gateway: GatewayFactory, busy_timeout_ms: int
) -> Iterator[tuple[Gateway, SocketDouble, _StreamReader]]:
    """A stream through the gateway, its first event read, from an engine that ends it when its gate opens."""
    gated = SocketDouble("gated")
    try:
        gw = make_gateway(
            engines=[EngineRef("m", gated.url, "k")], database={"sqlite_busy_timeout_ms": busy_timeout_ms}
        )
        reader = _StreamReader(gw, gw.create_key())
        assert reader.first_event.wait(10), "no first event"
        yield gw, gated, reader
    finally:
        gated.close()


def test_a_stream_ends_only_once_its_final_record_is_committed(make_gateway: GatewayFactory) -> None:
    """`data: [DONE]` is held back while the final record waits for the audit
    store (here another process holds SQLite's write lock for a second), so a
    client that has the whole stream can rely on its record."""
    with _gated_stream(make_gateway, busy_timeout_ms=10000) as (gw, gated, reader):
        with sqlite_write_lock(gw.database_url.split(":///", 1)[1]):
            gated.gate.set()  # the engine ends its stream; the final record now waits for the lock
            time.sleep(1.0)
            released = time.monotonic()
        reader.join()
    assert reader.body.endswith(b"data: [DONE]\n\n"), reader.body
    assert reader.ended_at > released
    assert [r["phase"] for r in reader.records_at_end] == ["intent", "final"]
    assert reader.records_at_end[1]["outcome"] == "ok"


def test_an_audit_store_failing_at_the_end_of_a_stream_replaces_done_with_an_error(
    make_gateway: GatewayFactory,
) -> None:
    with _gated_stream(make_gateway, busy_timeout_ms=300) as (gw, gated, reader):
        with sqlite_write_lock(gw.database_url.split(":///", 1)[1]):
            gated.gate.set()
            reader.join()
        events = [e for e in reader.body.split(b"\n\n") if e]
        assert events[0].startswith(b'data: {"id":"x"')
        assert b"[DONE]" not in reader.body
        assert b'"code":"audit_unavailable"' in events[-1]
        assert [r["phase"] for r in gw.records(reader.request_id)] == ["intent"]


def test_sqlite_locked_by_another_process_refuses_calls(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    gw = make_gateway(
        engines=[EngineRef("m", tripwire.url, "k")],
        gateway={"engine_read_timeout": 1.0},
        database={"sqlite_busy_timeout_ms": 300},
    )
    key = gw.create_key()
    with sqlite_write_lock(gw.database_url.split(":///", 1)[1]):
        _assert_refused_without_engine(gw, key, tripwire)
    _assert_reaches_engine(gw, key, tripwire)


@contextmanager
def immutable(paths: list[Path]) -> Iterator[None]:
    """Make files read-only even for root (chattr +i)."""
    done: list[Path] = []
    try:
        for p in paths:
            if subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode != 0:
                pytest.skip("chattr +i is not available here (needs root on ext4-like filesystems)")
            done.append(p)
        yield
    finally:
        for p in done:
            subprocess.run(["chattr", "-i", str(p)], check=True)


def test_sqlite_file_made_read_only_refuses_calls(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"engine_read_timeout": 1.0})
    key = gw.create_key()
    # A first refused call creates the WAL file, which is made read-only too.
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 401
    db = Path(gw.database_url.split(":///", 1)[1])
    with immutable([db, db.with_name(db.name + "-wal")]):
        _assert_refused_without_engine(gw, key, tripwire)
    _assert_reaches_engine(gw, key, tripwire)


@pytest.mark.postgres
def test_an_export_that_fails_part_way_leaves_no_file_that_looks_whole(
    make_gateway: GatewayFactory, fresh_pg_url: str, tmp_path: Path
) -> None:
    """`audit export -o` on a disk that fills up part way (a real one: the
    process's file-size limit) used to leave the lines written so far under the
    export's name, a file an auditor could take for the whole trail."""
    engine = SocketDouble("usage")
    try:
        gw = make_gateway(engines=[EngineRef("m", engine.url, "k")], database_url=fresh_pg_url)
        key = gw.create_key()
        for _ in range(60):
            assert gw.post("/v1/chat/completions", json=CHAT, key=key).status_code == 200
    finally:
        engine.close()
    exports = tmp_path / "exports"
    exports.mkdir()
    earlier = exports / "trail.jsonl"
    gw.bastion("audit", "export", "-o", str(earlier))
    kept = earlier.read_bytes()
    # Room for the CLI's own records in the anchor file, not for the export.
    limit = (gw.config.parent / "state" / "audit-anchor.jsonl").stat().st_size + 16 * 1024
    assert len(kept) > limit

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    for target in (earlier, exports / "new.csv"):
        args = ["audit", "export", "--config", str(gw.config), "-o", str(target), "--format", target.suffix[1:]]
        failed = subprocess.run([BASTION, *args], capture_output=True, text=True, preexec_fn=full_disk, check=False)
        assert failed.returncode == 1 and "was not written" in failed.stderr, failed.stderr
    assert sorted(exports.iterdir()) == [earlier] and earlier.read_bytes() == kept
    assert earlier.stat().st_mode & 0o777 == 0o600


@pytest.mark.postgres
def test_postgres_refusing_connections_refuses_calls(
    make_gateway: GatewayFactory, fresh_pg_url: str, tripwire: SocketDouble
) -> None:
    proxy = TcpProxy(5432)
    proxied_url = fresh_pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], database_url=proxied_url)
    key = gw.create_key()
    assert gw.post("/v1/chat/completions", json=CHAT).status_code == 401  # store works before the cut
    proxy.cut()
    _assert_refused_without_engine(gw, key, tripwire)


@contextmanager
def pg_role(pg_url: str) -> Iterator[tuple[str, Callable[..., None]]]:
    """A login role of its own for a gateway (its URL), and a way to run SQL
    as the database's owner (to take the role's rights away mid-test)."""
    import asyncio

    from sqlalchemy import text

    from gateway.db import create_engine

    role = f"bastion_writer_{secrets.token_hex(4)}"

    async def run(*sql: str) -> None:
        engine = create_engine(pg_url)
        try:
            async with engine.begin() as conn:
                for s in sql:
                    await conn.execute(text(s.format(role=role)))
        finally:
            await engine.dispose()

    def owner(*sql: str) -> None:
        asyncio.run(run(*sql))

    owner(
        "CREATE ROLE {role} LOGIN",
        "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}",
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
    )
    try:
        yield pg_url.replace("://postgres@", f"://{role}@"), owner
    finally:
        owner("DROP OWNED BY {role}", "DROP ROLE {role}")


@pytest.mark.postgres
def test_postgres_denying_inserts_refuses_calls(
    make_gateway: GatewayFactory, fresh_pg_url: str, tripwire: SocketDouble
) -> None:
    """The database itself refuses the write: the gateway's role loses INSERT."""
    with pg_role(fresh_pg_url) as (user_url, owner):
        gw = make_gateway(
            engines=[EngineRef("m", tripwire.url, "k")], database_url=user_url, gateway={"engine_read_timeout": 1.0}
        )
        key = gw.create_key()
        owner("REVOKE INSERT ON audit_records FROM {role}")
        try:
            r = gw.post("/v1/chat/completions", json=CHAT, key=key)
            assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
            assert tripwire.calls == 0
        finally:
            gw.stop()


@pytest.mark.postgres
def test_a_database_error_the_gateway_did_not_expect_is_a_500_on_record(
    make_gateway: GatewayFactory, fresh_pg_url: str, tripwire: SocketDouble
) -> None:
    """The database refuses a read (the role lost SELECT on the payload table,
    which only the one-call lookup reads). That was a 500 from the framework's
    last-resort handler, with no audit record of the auditor's request."""
    with pg_role(fresh_pg_url) as (user_url, owner):
        gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], database_url=user_url)
        auditor = gw.create_key(role="auditor")
        owner("REVOKE SELECT ON audit_payloads FROM {role}")
        try:
            r = gw.get("/admin/audit/events/0123", key=auditor)
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
            final = gw.final(r.headers["x-request-id"])
            assert (final["outcome"], final["error_type"], final["role"]) == ("error", "internal_error", "auditor")
            assert "call.internal_error" in {e.get("event") for e in gw.log_events()}
        finally:
            gw.stop()


# A real fault of PostgreSQL's on the queries whose text is LIKE `query`
# (through a row-level security policy on the gateway's role): a read error, or
# a read that stalls (once per transaction) until it is cancelled. Other reads,
# and every write, go through.
_READ_FAULTS = {
    "fails": "RAISE EXCEPTION 'could not read block 7 of audit_records (a test double)';",
    "stalls": """IF coalesce(current_setting('bastion.stalled', true), '') = '' THEN
                PERFORM set_config('bastion.stalled', 'yes', true);
                PERFORM pg_sleep(20);
            END IF;""",
}


def _export_trap(query: str, fault: str) -> str:
    return f"""CREATE OR REPLACE FUNCTION bastion_export_trap() RETURNS boolean LANGUAGE plpgsql AS $trap$
    BEGIN
        IF current_query() LIKE '{query}' THEN
            {_READ_FAULTS[fault]}
        END IF;
        RETURN true;
    END $trap$"""


def _call_records(database_url: str, request_id: str) -> list[dict[str, Any]]:
    """A call's records once its final one has landed (a task writes a `client_closed` one)."""
    deadline = time.monotonic() + 10
    while True:
        records = fetch_records(database_url, request_id)
        if records[-1]["phase"] == "final" or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


_EXPORT_TRAP = (
    "ALTER TABLE audit_records ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY export_trap ON audit_records FOR SELECT TO {role} USING (bastion_export_trap())",
    "CREATE POLICY writes ON audit_records FOR INSERT TO {role} WITH CHECK (true)",
)
_EXPORT_TRAP_REMOVED = (
    "DROP POLICY IF EXISTS export_trap ON audit_records",
    "DROP POLICY IF EXISTS writes ON audit_records",
    "ALTER TABLE audit_records DISABLE ROW LEVEL SECURITY",
    "DROP FUNCTION IF EXISTS bastion_export_trap()",
)


def _more_than_one_keyset_step(gw: Gateway) -> None:
    """Over 2,000 records (an export reads 2,000 at a step): refused calls, one record each."""

    def refused_calls(n: int) -> None:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            for _ in range(n):
                assert client.get("/v1/models").status_code == 401

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(refused_calls, [520] * 4))


@pytest.mark.postgres
def test_an_api_export_the_database_breaks_off_is_cut_short_and_on_record(
    make_gateway: GatewayFactory, fresh_pg_url: str, tripwire: SocketDouble
) -> None:
    """An API export's record was written `ok` before its first byte, and stayed
    `ok` when the database broke the export off part way: the trail said an
    auditor got records they never got. Now its intent is on record first and
    its final record says how it ended and how many records went out; the
    client's body is cut short (no chunked end), so it cannot pass for whole."""
    with pg_role(fresh_pg_url) as (user_url, owner):
        gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], database_url=user_url)
        auditor = gw.create_key(role="auditor")

        _more_than_one_keyset_step(gw)
        # An export's second keyset step, `(started_at, id) > …`, stalls, and the client goes away.
        second_step = "%audit_records.id) >%"
        owner(_export_trap(second_step, "stalls"), *_EXPORT_TRAP)
        try:
            headers = {"authorization": f"Bearer {auditor}"}
            url = gw.url + "/admin/audit/events"
            with httpx.stream("GET", url, params={"format": "jsonl"}, headers=headers, timeout=60) as r:
                request_id = r.headers["x-request-id"]
                assert r.status_code == 200 and next(r.iter_bytes())
            intent, final = _call_records(fresh_pg_url, request_id)
            assert (intent["phase"], final["outcome"], final["error_type"]) == ("intent", "client_closed", None)
            # Those of the first step's chunks that were handed to the server (the rest were held back).
            assert 0 < json.loads(final["detail"])["records"] < 2000

            # The second step fails: the client's body is cut short.
            owner(_export_trap(second_step, "fails"))
            with httpx.stream("GET", url, params={"format": "jsonl"}, headers=headers, timeout=60) as r:
                assert r.status_code == 200
                request_id = r.headers["x-request-id"]
                got = bytearray()
                with pytest.raises(httpx.RemoteProtocolError):
                    for part in r.iter_bytes():
                        got += part
            intent, final = _call_records(fresh_pg_url, request_id)
            assert (intent["phase"], final["outcome"], final["error_type"]) == ("intent", "error", "internal_error")
            assert 0 < json.loads(final["detail"])["records"] == got.count(b"\n") < 2000, "what went out"

            # Unreadable from the first step: an error answer, not a 200 cut short.
            owner(_export_trap("%ORDER BY audit_records.started_at, audit_records.id%", "fails"))
            r = gw.get("/admin/audit/events", key=auditor, params={"format": "csv"})
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
            intent, final = _call_records(fresh_pg_url, r.headers["x-request-id"])
            assert (intent["phase"], final["outcome"], final["http_status"]) == ("intent", "error", 500)
        finally:
            owner(*_EXPORT_TRAP_REMOVED)
            gw.stop()


@pytest.mark.postgres
def test_a_cli_export_the_database_breaks_off_says_so_and_is_on_record(
    make_gateway: GatewayFactory, fresh_pg_url: str, tripwire: SocketDouble, tmp_path: Path
) -> None:
    """`bastion audit export` that the database broke off part way ended in a
    Python traceback, and the trail held only that it began. Now it exits 1
    saying how far it got, and `cli.audit.export.end` records how it ended."""
    with pg_role(fresh_pg_url) as (user_url, owner):
        gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], database_url=user_url)
        _more_than_one_keyset_step(gw)
        owner(_export_trap("%audit_records.id) >%", "fails"), *_EXPORT_TRAP)
        try:
            target = tmp_path / "trail.jsonl"
            told = []
            for args in (["-o", str(target)], []):
                done = gw.bastion("audit", "export", *args, check=False)
                assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
                assert ("was not written" if args else "is not the whole export") in done.stderr
                said = re.search(r"the export failed after (\d+) records \(", done.stderr)
                assert said, done.stderr
                told.append(int(said.group(1)))
            assert not target.exists() and 0 < len(done.stdout.splitlines()) == told[1] < 2000

            owner(_export_trap("%matches no query of the export%", "fails"))
            gw.bastion("audit", "export", "-o", str(target))
            assert target.exists()
        finally:
            owner(*_EXPORT_TRAP_REMOVED)
            gw.stop()
    ends = [r for r in fetch_records(fresh_pg_url) if r["route"] == "cli.audit.export.end"]
    assert [(r["outcome"], json.loads(r["detail"])["records"]) for r in ends[:2]] == [("error", n) for n in told]
    assert all("could not read block 7" in r["error_message"] for r in ends[:2])
    whole = len(target.read_text().splitlines())
    assert ends[2]["outcome"] == "ok" and json.loads(ends[2]["detail"])["records"] == whole


def test_a_stalled_database_fills_the_bounded_queue_and_the_rest_are_refused_at_once(
    make_gateway: GatewayFactory, tripwire: SocketDouble
) -> None:
    """Memory cannot grow without bound: past audit.queue_max waiting records,
    calls are refused (503) at once instead of buffered."""
    gw = make_gateway(
        engines=[EngineRef("m", tripwire.url, "k")],
        gateway={"engine_read_timeout": 1.0},
        database={"sqlite_busy_timeout_ms": 2000},
        audit={"queue_max": 4},
    )
    key = gw.create_key()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with sqlite_write_lock(gw.database_url.split(":///", 1)[1]), concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: gw.post("/v1/chat/completions", key=key, json=body), range(16)))
    assert all(a.status_code == 503 and a.json()["error"]["code"] == "audit_unavailable" for a in answers)
    reasons = [json.loads(line).get("error_type") for line in gw.log_path.read_text().splitlines() if '"call"' in line]
    assert reasons.count("queue_full") >= 8, reasons
    assert tripwire.calls == 0
    _assert_reaches_engine(gw, key, tripwire)

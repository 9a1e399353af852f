"""The hot path: the SQLite key look-up on the event loop, commits with and
without their own sync, and time-ordered request ids.

Against a real SQLite file in WAL mode: a look-up made on the event loop sees
every commit before it (a revocation counts on the next call), and when the
file is locked the look-up waits on the reader thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import migrate
from gateway.audit.record import new_request_id
from gateway.db import create_engine
from gateway.errors import Unauthenticated
from gateway.hotpath import Batch, ThreadedSQLiteHotPath
from gateway.keys import KeyStore

PEPPER = b"p" * 32


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bastion.db'}"
    migrate.upgrade(url)
    return url


class _LoopTicks:
    """Counts the 10 ms sleeps the event loop completes inside the block: whether it kept running."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _LoopTicks:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.count += 1


def test_inline_lookup_sees_revocation_and_expiry_at_once(db_url: str) -> None:
    async def go() -> None:
        engine = create_engine(db_url)
        hot = ThreadedSQLiteHotPath(db_url, busy_timeout_ms=5000)
        keys = KeyStore(engine, PEPPER, hot)
        try:
            new = await keys.create(name="a", role="user", team="t", expires_at=datetime.now(UTC) + timedelta(days=1))
            principal = await keys.authenticate(f"Bearer {new.secret}")
            assert (principal.key_id, principal.team, principal.role) == (new.info.key_id, "t", "user")
            row = await hot.key_row(new.info.key_id)
            assert row.expires_at is not None and row.expires_at.tzinfo is None  # naive UTC, as SQLAlchemy reads it
            assert abs(row.expires_at.replace(tzinfo=UTC) - new.info.expires_at) < timedelta(seconds=1)
            assert await keys.revoke(new.info.key_id)
            with pytest.raises(Unauthenticated) as err:
                await keys.authenticate(f"Bearer {new.secret}")
            assert err.value.audit_reason == "revoked_key"
            assert await hot.key_row("nosuchkey000") is None
        finally:
            await hot.close()
            await engine.dispose()

    asyncio.run(go())


def test_locked_file_waits_on_the_reader_thread_not_the_loop(db_url: str) -> None:
    """Another process holding the file exclusively makes the inline read fail at
    once; the look-up then waits on the reader thread while the loop runs on."""
    path = db_url.split("///", 1)[1]

    async def create() -> str:
        engine = create_engine(db_url)
        try:
            return (await KeyStore(engine, PEPPER).create(name="a", role="user", team="t")).secret
        finally:
            await engine.dispose()

    async def look_up(secret: str) -> tuple[str, float, int]:
        engine = create_engine(db_url)
        hot = ThreadedSQLiteHotPath(db_url, busy_timeout_ms=5000)
        try:
            async with _LoopTicks() as ticks:
                t0 = time.monotonic()
                principal = await KeyStore(engine, PEPPER, hot).authenticate(f"Bearer {secret}")
                return principal.name, time.monotonic() - t0, ticks.count
        finally:
            await hot.close()
            await engine.dispose()

    secret = asyncio.run(create())
    # No other connection is open now, so this one can take the file for itself.
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("PRAGMA locking_mode=EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("UPDATE api_keys SET name = 'b'")
    release = threading.Timer(0.5, lambda: (locker.execute("COMMIT"), locker.close()))
    release.start()
    name, waited, ticks = asyncio.run(look_up(secret))
    release.join()
    assert name == "b"  # read once the lock went, so it sees the update
    assert waited >= 0.4
    assert ticks >= 20  # the loop kept running while the look-up waited


def test_a_batch_waits_for_a_held_write_lock_on_the_writer_thread_not_the_loop(db_url: str) -> None:
    """Audit batches commit on the event loop while the write lock is free. One
    that finds it held (another process writing) waits on the writer thread:
    the loop runs on, and the batch lands once the lock is released."""
    path = db_url.split("///", 1)[1]
    now = datetime.now(UTC)

    def batch(request_id: str) -> Batch:
        row = dict(request_id=request_id, phase="intent", started_at=now, method="POST", route="/v1/x", stream=False)
        return Batch([row])

    async def go(locker: sqlite3.Connection) -> tuple[float, int, list[str]]:
        hot = ThreadedSQLiteHotPath(db_url, busy_timeout_ms=5000)
        try:
            async with _LoopTicks() as ticks:
                await hot.write_batch(batch("free"))
                locker.execute("BEGIN IMMEDIATE")
                release = threading.Timer(0.5, lambda: locker.execute("COMMIT"))
                release.start()
                t0 = time.monotonic()
                await hot.write_batch(batch("held"))
                waited = time.monotonic() - t0
                release.join()
                await hot.write_batch(batch("free again"))
            rows = [r for (r,) in locker.execute("SELECT request_id FROM audit_records ORDER BY rowid")]
            return waited, ticks.count, rows
        finally:
            await hot.close()

    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        waited, ticks, rows = asyncio.run(go(locker))
    finally:
        locker.close()
    assert rows == ["free", "held", "free again"]
    assert waited >= 0.4  # it waited for the lock rather than failing
    assert ticks >= 20  # and the loop kept running meanwhile


def test_request_ids_are_uuid7_in_time_order() -> None:
    ids = []
    for _ in range(50):
        ids.append(new_request_id())
        time.sleep(0.002)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert len(value) == 32 and parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert abs(int(value[:12], 16) / 1000 - time.time()) < 5


# A child process that commits audit batches through the hot path, then dies
# without closing anything (as a killed gateway would).
_WRITE_AND_DIE = """
import asyncio, os, sys
from datetime import UTC, datetime
from gateway.hotpath import Batch, hot_path_for

url, synced, count = sys.argv[1], sys.argv[2] == "synced", int(sys.argv[3])

async def go():
    hot = hot_path_for(url, None, busy_timeout_ms=5000)
    now = datetime.now(UTC)
    for i in range(count):
        row = dict(request_id=f"r{i}", phase="intent", started_at=now, method="POST", route="/v1/x", stream=False)
        await hot.write_batch(Batch([row], synced=synced))
    os._exit(0)

asyncio.run(go())
"""


def _syncs_and_rows(db_url: str, synced: str, count: int, tmp_path: Path) -> tuple[int, int]:
    """(fsync and fdatasync calls the child made, rows another process then reads)."""
    trace = tmp_path / f"strace-{synced}.txt"
    argv = ["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace),
            sys.executable, "-c", _WRITE_AND_DIE, db_url, synced, str(count)]  # fmt: skip
    subprocess.run(argv, check=True, cwd=Path(__file__).parents[1], timeout=120)
    syncs = sum(1 for line in trace.read_text().splitlines() if "sync(" in line)
    with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
        rows = conn.execute("SELECT count(*) FROM audit_records").fetchone()[0]
    return syncs, rows


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to count the driver's syncs")
def test_an_unsynced_commit_survives_the_process_and_the_next_synced_one_flushes(db_url: str, tmp_path: Path) -> None:
    """A non-streamed call's intent is committed without a sync of its own: the
    database has it when the gateway dies, and only synced commits call fsync."""
    unsynced, rows = _syncs_and_rows(db_url, "unsynced", 20, tmp_path)
    assert rows == 20  # committed: another process reads every record after the writer died
    synced, rows = _syncs_and_rows(db_url, "synced", 20, tmp_path)
    assert rows == 40
    assert unsynced <= 2, f"unsynced commits called fsync {unsynced} times"  # opening the WAL may sync once
    assert synced >= 20, f"20 synced commits called fsync {synced} times"


@pytest.mark.postgres
def test_an_unsynced_commit_on_postgres_is_committed_and_scoped_to_its_transaction(fresh_pg_url: str) -> None:
    from sqlalchemy import text

    from gateway.hotpath import AsyncHotPath, Batch

    async def go() -> tuple[int, list[str]]:
        engine = create_engine(fresh_pg_url)
        hot = AsyncHotPath(engine)
        now = datetime.now(UTC)
        try:
            row = dict(request_id="r1", phase="intent", started_at=now, method="POST", route="/v1/x", stream=False)
            await hot.write_batch(Batch([row], synced=False))
            other = create_engine(fresh_pg_url)
            try:
                async with other.connect() as conn:
                    rows = (await conn.execute(text("SELECT count(*) FROM audit_records"))).scalar_one()
            finally:
                await other.dispose()
            # The setting was the transaction's own: the pool's connections commit synchronously again.
            async with engine.connect() as conn:
                modes = [(await conn.execute(text("SHOW synchronous_commit"))).scalar_one()]
            return rows, modes
        finally:
            await engine.dispose()

    rows, modes = asyncio.run(go())
    assert rows == 1
    assert modes == ["on"]

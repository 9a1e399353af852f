"""The SQLite hot path's key look-up on the event loop, and time-ordered request ids.

Against a real SQLite file in WAL mode: a look-up made on the event loop sees
every commit before it (a revocation counts on the next call), and when the
file is locked the look-up waits on the reader thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
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
from gateway.hotpath import ThreadedSQLiteHotPath
from gateway.keys import KeyStore

PEPPER = b"p" * 32


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bastion.db'}"
    migrate.upgrade(url)
    return url


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
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            t0 = time.monotonic()
            principal = await KeyStore(engine, PEPPER, hot).authenticate(f"Bearer {secret}")
            return principal.name, time.monotonic() - t0, ticks
        finally:
            ticker.cancel()
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

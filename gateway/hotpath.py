"""The SQL statements on every call's path: look up a key, commit an audit batch.

Two implementations behind one interface, chosen by the database URL:

- PostgreSQL: SQLAlchemy Core over the async engine (asyncpg is natively
  async, so a statement costs no thread hand-off).
- SQLite: SQLAlchemy Core over a *sync* engine, each statement run whole on a
  dedicated thread (one for writes, so batches stay in order and share one
  fsync; one for reads). aiosqlite hands every cursor call (execute, fetch,
  close, the pool's rollback) to its thread separately; measured on this
  2-core machine that made a key look-up 0.8 ms and a durable audit write
  0.7-1.5 ms. One hand-off per statement is what the latency budget allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Connection, Row
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.record import GENESIS
from gateway.db import is_sqlite, sqlite_pragmas
from gateway.tables import api_keys, audit_checkpoints, audit_payloads, audit_records

T = TypeVar("T")

KEY_QUERY = sa.select(
    api_keys.c.name,
    api_keys.c.role,
    api_keys.c.team,
    api_keys.c.secret_hash,
    api_keys.c.expires_at,
    api_keys.c.revoked_at,
    api_keys.c.can_decrypt,
).where(api_keys.c.key_id == sa.bindparam("key_id"))


@dataclass(frozen=True)
class Batch:
    """One group commit: chained records, the checkpoints due, encrypted payloads."""

    records: Sequence[dict[str, Any]]
    checkpoints: Sequence[dict[str, Any]] = ()
    payloads: Sequence[dict[str, Any]] = ()


@dataclass(frozen=True)
class StreamTail:
    seq: int
    head: str
    checkpointed: int  # -1 when the stream has no checkpoint yet


def _statements(batch: Batch) -> list[tuple[sa.Table, Sequence[dict[str, Any]]]]:
    """The statements of a batch, in order (the caller executes them in one transaction)."""
    return [
        (table, rows)
        for table, rows in (
            (audit_records, batch.records),
            (audit_checkpoints, batch.checkpoints),
            (audit_payloads, batch.payloads),
        )
        if rows
    ]


def _tail_queries(stream_id: str) -> tuple[sa.Select[Any], sa.Select[Any]]:
    last = (
        sa.select(audit_records.c.seq, audit_records.c.record_hash)
        .where(audit_records.c.stream_id == stream_id)
        .order_by(audit_records.c.seq.desc())
        .limit(1)
    )
    checkpointed = sa.select(sa.func.max(audit_checkpoints.c.seq)).where(audit_checkpoints.c.stream_id == stream_id)
    return last, checkpointed


def _tail(last: Row[Any] | None, checkpointed: int | None) -> StreamTail:
    if last is None:
        return StreamTail(0, GENESIS, -1 if checkpointed is None else checkpointed)
    return StreamTail(last.seq, last.record_hash, -1 if checkpointed is None else checkpointed)


class HotPath(Protocol):
    async def key_row(self, key_id: str) -> Row[Any] | None: ...

    async def write_batch(self, batch: Batch) -> None: ...

    async def stream_tail(self, stream_id: str) -> StreamTail: ...

    async def close(self) -> None: ...


class AsyncHotPath:
    def __init__(self, engine: AsyncEngine):
        self._engine = engine

    async def key_row(self, key_id: str) -> Row[Any] | None:
        async with self._engine.connect() as conn:
            return (await conn.execute(KEY_QUERY, {"key_id": key_id})).first()

    async def write_batch(self, batch: Batch) -> None:
        async with self._engine.begin() as conn:
            for table, rows in _statements(batch):
                await conn.execute(sa.insert(table), list(rows))

    async def stream_tail(self, stream_id: str) -> StreamTail:
        last, checkpointed = _tail_queries(stream_id)
        async with self._engine.connect() as conn:
            return _tail((await conn.execute(last)).first(), (await conn.execute(checkpointed)).scalar())

    async def close(self) -> None:
        return None


# The audit writer's page cache (SQLite's default is 2 MiB; other connections
# get 64 MiB, gateway.db). SQLite keeps every page it writes until the cache is
# full, so this bounds how much of the gateway's memory the audit table takes:
# with time-ordered request ids (new_request_id) inserts touch only the last
# pages of each index, and 16 MiB holds the writer's working set
# (bench/audit_throughput.py) within the gateway's memory budget (bench/suite).
WRITER_CACHE_KIB = 16 * 1024


class _Lane:
    """One thread and the one SQLite connection only it uses."""

    def __init__(self, engine: sa.Engine, name: str, *, cache_kib: int | None = None):
        self._engine = engine
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._conn: Connection | None = None
        self._cache_kib = cache_kib

    async def run(self, fn: Callable[[Connection], T]) -> T:
        def call() -> T:
            if self._conn is None:
                self._conn = self._engine.connect()
                if self._cache_kib:
                    self._conn.exec_driver_sql(f"PRAGMA cache_size=-{int(self._cache_kib)}")
            conn = self._conn
            try:
                return fn(conn)
            except BaseException:
                # A broken connection is dropped; the next statement opens a new one.
                self._conn = None
                conn.invalidate()
                raise

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def close(self) -> None:
        def close_conn() -> None:
            if self._conn is not None:
                self._conn.close()

        await asyncio.get_running_loop().run_in_executor(self._pool, close_conn)
        self._pool.shutdown()


def _sqlite_datetime(value: datetime | None) -> str | None:
    # Exactly SQLAlchemy's SQLite DATETIME storage format (UTC wall time), so
    # its readers and comparisons see what its own writer would have written.
    return None if value is None else value.astimezone(UTC).isoformat(" ", "microseconds")[:26]


class KeyRow(NamedTuple):
    """The columns of KEY_QUERY, as the inline SQLite read returns them."""

    name: str
    role: str
    team: str
    secret_hash: str
    expires_at: datetime | None
    revoked_at: datetime | None
    can_decrypt: bool


# KEY_QUERY compiled once for the driver itself (one positional parameter: the key id).
_INLINE_KEY_SQL = str(KEY_QUERY.compile(dialect=sqlite_dialect()))
assert KeyRow._fields == tuple(c.name for c in KEY_QUERY.selected_columns), "KeyRow must follow KEY_QUERY"


def _parse_sqlite_datetime(value: str | None) -> datetime | None:
    # The reverse of _sqlite_datetime: naive UTC wall time, as SQLAlchemy's own reader returns it.
    return None if value is None else datetime.fromisoformat(value)


def _sqlite_insert(table: sa.Table, rows: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[Any, ...]]]:
    """One executemany straight to the driver: SQLAlchemy's per-row bind
    processing was most of the audit writer's time (measured: bench/audit_throughput.py)."""
    names = list(rows[0])
    converters = [_sqlite_datetime if isinstance(table.c[n].type, sa.DateTime) else None for n in names]
    # Only the table's own column names (each looked up in table.c above) reach the SQL text.
    statement = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608
    pairs = list(zip(names, converters, strict=True))
    params = [tuple(conv(row[n]) if conv else row[n] for n, conv in pairs) for row in rows]
    return statement, params


class ThreadedSQLiteHotPath:
    def __init__(self, url: str, *, busy_timeout_ms: int):
        # Same file, sync pysqlite driver, the same durability pragmas.
        self._engine = sa.create_engine(url.replace("sqlite+aiosqlite://", "sqlite://", 1), poolclass=sa.pool.NullPool)
        sa.event.listen(self._engine, "connect", sqlite_pragmas(busy_timeout_ms))
        self._writer = _Lane(self._engine, "audit-sqlite-writer", cache_kib=WRITER_CACHE_KIB)
        self._reader = _Lane(self._engine, "keys-sqlite-reader")
        # Key look-ups first try a connection used on the event loop itself,
        # which never waits for a lock (timeout 0) and only reads.
        self._path = sa.engine.make_url(url).database or ""
        self._inline: sqlite3.Connection | None = None

    async def key_row(self, key_id: str) -> Any:
        """A key's row, read on the event loop when the file lets it at once.

        The keys table is a few pages that stay in the kernel's page cache, and
        in WAL mode a read never waits for the audit writer: the read costs
        tens of microseconds on the driver directly, where SQLAlchemy and a
        hand-off to a thread and back cost more than the rest of
        authentication (bench/suite, chat c=1). Anything that would make it
        wait (a lock, a checkpoint's exclusive moment) or fail goes to the
        reader thread instead, where waiting blocks no one.
        """
        try:
            return self._read_inline(key_id)
        except sqlite3.Error:
            self._drop_inline()

        def fetch(conn: Connection) -> Row[Any] | None:
            row = conn.execute(KEY_QUERY, {"key_id": key_id}).first()
            conn.rollback()  # end the read transaction so the next read sees new commits
            return row

        return await self._reader.run(fetch)

    def _read_inline(self, key_id: str) -> KeyRow | None:
        if self._inline is None:
            # Autocommit: each SELECT is its own read transaction and sees every commit before it.
            conn = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=1")
            self._inline = conn
        found = self._inline.execute(_INLINE_KEY_SQL, (key_id,)).fetchone()
        if found is None:
            return None
        name, role, team, secret_hash, expires_at, revoked_at, can_decrypt = found
        return KeyRow(name, role, team, secret_hash, _parse_sqlite_datetime(expires_at),
                      _parse_sqlite_datetime(revoked_at), bool(can_decrypt))  # fmt: skip

    def _drop_inline(self) -> None:
        if self._inline is not None:
            with contextlib.suppress(sqlite3.Error):
                self._inline.close()
            self._inline = None

    async def write_batch(self, batch: Batch) -> None:
        def write(conn: Connection) -> None:
            for table, rows in _statements(batch):
                statement, params = _sqlite_insert(table, rows)
                conn.exec_driver_sql(statement, params)
            conn.commit()

        await self._writer.run(write)

    async def stream_tail(self, stream_id: str) -> StreamTail:
        last, checkpointed = _tail_queries(stream_id)

        def read(conn: Connection) -> StreamTail:
            tail = _tail(conn.execute(last).first(), conn.execute(checkpointed).scalar())
            conn.rollback()
            return tail

        return await self._writer.run(read)

    async def close(self) -> None:
        await self._writer.close()
        await self._reader.close()
        self._drop_inline()
        self._engine.dispose()


def hot_path_for(url: str, engine: AsyncEngine, *, busy_timeout_ms: int) -> HotPath:
    if is_sqlite(url):
        return ThreadedSQLiteHotPath(url, busy_timeout_ms=busy_timeout_ms)
    return AsyncHotPath(engine)

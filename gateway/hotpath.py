"""The SQL statements on every call's path: look up a key, commit an audit batch.

Two implementations behind one interface, chosen by the database URL:

- PostgreSQL: SQLAlchemy Core over the async engine (asyncpg is natively
  async, so a statement costs no thread hand-off).
- SQLite: the sqlite3 driver itself, with SQL compiled once from the same
  SQLAlchemy statements. A key look-up and an audit batch each run on the
  event loop when the file lets them at once (no lock to wait for), and
  otherwise whole on a dedicated thread (one for writes, one for reads), where
  waiting blocks no one. aiosqlite hands every cursor call (execute, fetch,
  close, the pool's rollback) to its thread separately; measured on this
  2-core machine that made a key look-up 0.8 ms and a durable audit write
  0.7-1.5 ms. Even one hand-off each way costs more than the work: committing
  on the loop took 0.29 ms of CPU and 0.3 ms of latency off every call
  (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, NamedTuple, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Row
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
    api_keys.c.previous_secret_hash,
    api_keys.c.previous_expires_at,
).where(api_keys.c.key_id == sa.bindparam("key_id"))


@dataclass(frozen=True)
class Batch:
    """One group commit: chained records, the checkpoints due, encrypted payloads.

    `synced`: the commit returns once flushed to disk. Otherwise it returns once
    the database has it (it survives the gateway process, not a power loss) and
    reaches the disk with the next synced commit, which flushes the log in order.
    """

    records: Sequence[dict[str, Any]]
    checkpoints: Sequence[dict[str, Any]] = ()
    payloads: Sequence[dict[str, Any]] = ()
    synced: bool = True


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


def _tail(last: Sequence[Any] | None, checkpointed: int | None) -> StreamTail:
    """The tail from the two _tail_queries' answers: (seq, record_hash) of the last record, the last checkpoint."""
    done = -1 if checkpointed is None else checkpointed
    return StreamTail(0, GENESIS, done) if last is None else StreamTail(last[0], last[1], done)


class HotPath(Protocol):
    async def key_row(self, key_id: str) -> KeyRow | Row[Any] | None: ...

    async def write_batch(self, batch: Batch) -> None: ...

    async def stream_tail(self, stream_id: str) -> StreamTail: ...

    async def close(self) -> None: ...


# For a batch written with synced=False (PostgreSQL's asynchronous commit, this transaction only).
_ASYNC_COMMIT = sa.text("SET LOCAL synchronous_commit TO off")


class AsyncHotPath:
    def __init__(self, engine: AsyncEngine):
        self._engine = engine

    async def key_row(self, key_id: str) -> Row[Any] | None:
        async with self._engine.connect() as conn:
            return (await conn.execute(KEY_QUERY, {"key_id": key_id})).first()

    async def write_batch(self, batch: Batch) -> None:
        async with self._engine.begin() as conn:
            if not batch.synced:
                # This transaction's commit does not wait for its log flush; the
                # next synchronous commit's flush covers it (the log is written in order).
                await conn.execute(_ASYNC_COMMIT)
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

_Job = tuple[Callable[[sqlite3.Connection], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _answer(done: asyncio.Future[T], result: T) -> None:
    if not done.done():  # the caller may have given up (cancelled)
        done.set_result(result)


def _fail(done: asyncio.Future[Any], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)


class _Lane:
    """One thread and the one SQLite connection only it uses.

    Work goes to the thread on a SimpleQueue and comes back through
    `call_soon_threadsafe` on an asyncio future: one wake-up each way.
    `run_in_executor` adds a concurrent.futures future chained to an asyncio
    one, and SQLAlchemy's Connection its own layers, to every audit write:
    together about 0.1 ms of a 0.5-0.6 ms durable write on this machine
    (bench/audit_latency.py).
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str):
        self._connect = connect
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, loop, done))
        return await done

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        while (job := self._jobs.get()) is not None:
            fn, loop, done = job
            try:
                if conn is None:
                    conn = self._connect()
                result = fn(conn)
            except BaseException as exc:
                # A broken connection is dropped (rolling back what it held);
                # the next job opens a new one.
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                conn = None
                _reply(loop, _fail, done, exc)
            else:
                _reply(loop, _answer, done, result)
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)


def _reply(loop: asyncio.AbstractEventLoop, how: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
        loop.call_soon_threadsafe(how, *args)


def _sqlite_datetime(value: datetime | None) -> str | None:
    # Exactly SQLAlchemy's SQLite DATETIME storage format (UTC wall time), so
    # its readers and comparisons see what its own writer would have written.
    return None if value is None else value.astimezone(UTC).isoformat(" ", "microseconds")[:26]


def _parse_sqlite_datetime(value: str | None) -> datetime | None:
    # The reverse of _sqlite_datetime: naive UTC wall time, as SQLAlchemy's own reader returns it.
    return None if value is None else datetime.fromisoformat(value)


class KeyRow(NamedTuple):
    """The columns of KEY_QUERY, as the SQLite driver's read returns them."""

    name: str
    role: str
    team: str
    secret_hash: str
    expires_at: datetime | None
    revoked_at: datetime | None
    can_decrypt: bool
    previous_secret_hash: str | None
    previous_expires_at: datetime | None


def _driver_sql(query: sa.Select[Any]) -> tuple[str, list[str], dict[str, Any]]:
    """A statement compiled once for the sqlite3 driver: its SQL, the order of
    its positional parameters, and the values bound in the statement itself."""
    compiled = query.compile(dialect=sqlite_dialect())
    return str(compiled), list(compiled.positiontup or ()), dict(compiled.params)


_KEY_SQL, _KEY_PARAMS, _ = _driver_sql(KEY_QUERY)
assert _KEY_PARAMS == ["key_id"], "KEY_QUERY takes the key id only"
assert KeyRow._fields == tuple(c.name for c in KEY_QUERY.selected_columns), "KeyRow must follow KEY_QUERY"


def _read_key(conn: sqlite3.Connection, key_id: str) -> KeyRow | None:
    found = conn.execute(_KEY_SQL, (key_id,)).fetchone()
    if found is None:
        return None
    name, role, team, secret_hash, expires_at, revoked_at, can_decrypt, previous_hash, previous_expires_at = found
    return KeyRow(name, role, team, secret_hash, _parse_sqlite_datetime(expires_at),
                  _parse_sqlite_datetime(revoked_at), bool(can_decrypt), previous_hash,
                  _parse_sqlite_datetime(previous_expires_at))  # fmt: skip


@functools.lru_cache(maxsize=16)
def _insert_plan(table: sa.Table, names: tuple[str, ...]) -> tuple[str, itemgetter[Any], tuple[int, ...]]:
    """An INSERT for these columns, compiled once: the SQL, a getter for the row's
    values in column order, and which of them are timestamps."""
    # Only the table's own column names (each looked up in table.c) reach the SQL text.
    times = tuple(i for i, n in enumerate(names) if isinstance(table.c[n].type, sa.DateTime))
    statement = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608
    return statement, itemgetter(*names), times


def _sqlite_insert(table: sa.Table, rows: Sequence[dict[str, Any]]) -> tuple[str, list[Sequence[Any]]]:
    """One executemany straight to the driver: SQLAlchemy's per-row bind
    processing was most of the audit writer's time (measured: bench/audit_throughput.py)."""
    statement, values_of, times = _insert_plan(table, tuple(rows[0]))
    params: list[Sequence[Any]] = []
    for row in rows:
        values = list(values_of(row)) if len(row) > 1 else [values_of(row)]
        for i in times:
            values[i] = _sqlite_datetime(values[i])
        params.append(values)
    return statement, params


def _read_tail(conn: sqlite3.Connection, stream_id: str) -> StreamTail:
    last, checkpointed = (_driver_sql(q) for q in _tail_queries(stream_id))

    def fetch(sql: str, order: list[str], bound: dict[str, Any]) -> Any:
        return conn.execute(sql, tuple(bound[name] for name in order)).fetchone()

    return _tail(fetch(*last), fetch(*checkpointed)[0])


class ThreadedSQLiteHotPath:
    def __init__(self, url: str, *, busy_timeout_ms: int):
        self._path = sa.engine.make_url(url).database or ""
        self._busy_timeout_ms = busy_timeout_ms
        self._writer = _Lane(lambda: self._connect(cache_kib=WRITER_CACHE_KIB), "audit-sqlite-writer")
        self._reader = _Lane(lambda: self._connect(query_only=True), "keys-sqlite-reader")
        # Key look-ups and audit batches first try connections used on the
        # event loop itself, which never wait for a lock (timeout 0).
        self._inline: sqlite3.Connection | None = None
        self._inline_writer: sqlite3.Connection | None = None

    def _connect(
        self, *, cache_kib: int | None = None, query_only: bool = False, wait: bool = True
    ) -> sqlite3.Connection:
        # The same durability pragmas as every other connection (gateway.db).
        busy_timeout_ms = self._busy_timeout_ms if wait else 0
        conn = sqlite3.connect(self._path, timeout=busy_timeout_ms / 1000)
        sqlite_pragmas(busy_timeout_ms)(conn, None)
        if cache_kib:
            conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        if query_only:
            conn.execute("PRAGMA query_only=1")
        return conn

    async def key_row(self, key_id: str) -> KeyRow | None:
        """A key's row, read on the event loop when the file lets it at once.

        The keys table is a few pages that stay in the kernel's page cache, and
        in WAL mode a read never waits for the audit writer: the read costs
        tens of microseconds on the driver directly, where a hand-off to a
        thread and back costs more than the rest of authentication
        (bench/suite, chat c=1). Anything that would make it wait (a lock, a
        checkpoint's exclusive moment) or fail goes to the reader thread
        instead, where waiting blocks no one.
        """
        try:
            if self._inline is None:
                # Autocommit: each SELECT is its own read transaction and sees every commit before it.
                self._inline = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
                self._inline.execute("PRAGMA query_only=1")
            return _read_key(self._inline, key_id)
        except sqlite3.Error:
            self._drop_inline()
        return await self._reader.run(lambda conn: _read_key(conn, key_id))

    def _drop_inline(self) -> None:
        if self._inline is not None:
            with contextlib.suppress(sqlite3.Error):
                self._inline.close()
            self._inline = None

    async def write_batch(self, batch: Batch) -> None:
        statements = [_sqlite_insert(table, rows) for table, rows in _statements(batch)]
        # In WAL mode, NORMAL commits to the log without syncing it; the next FULL
        # commit's sync covers the frames before it (gateway.db sets FULL).
        synchronous = f"PRAGMA synchronous={'FULL' if batch.synced else 'NORMAL'}"

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(synchronous)
            with conn:  # one transaction: committed (and synced, if asked), or rolled back on any error
                for statement, params in statements:
                    conn.executemany(statement, params)

        if not self._write_inline(write):
            await self._writer.run(write)

    def _write_inline(self, write: Callable[[sqlite3.Connection], None]) -> bool:
        """Commit on the event loop if the write lock is free at once; False if it is not.

        The audit writer runs one batch at a time, so this connection and the
        writer thread's never both hold a transaction. Another process holding
        the lock (a second gateway worker, the CLI) sends the batch to the
        writer thread, which waits up to the busy timeout without stopping the
        loop. A sync on the loop stalls the gateway as long as the disk does;
        no answer can be released before its record is on disk anyway.
        """
        try:
            if self._inline_writer is None:
                self._inline_writer = self._connect(cache_kib=WRITER_CACHE_KIB, wait=False)
            write(self._inline_writer)
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                # Dropped (as the writer thread drops its own); the next batch reconnects.
                self._drop_inline_writer()
                raise
            if self._inline_writer is not None and self._inline_writer.in_transaction:
                self._inline_writer.rollback()
            return False
        return True

    def _drop_inline_writer(self) -> None:
        if self._inline_writer is not None:
            with contextlib.suppress(sqlite3.Error):
                self._inline_writer.close()
            self._inline_writer = None

    async def stream_tail(self, stream_id: str) -> StreamTail:
        return await self._writer.run(lambda conn: _read_tail(conn, stream_id))

    async def close(self) -> None:
        await self._writer.close()
        await self._reader.close()
        self._drop_inline()
        self._drop_inline_writer()


def _is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): another connection holds the lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def hot_path_for(url: str, engine: AsyncEngine, *, busy_timeout_ms: int) -> HotPath:
    if is_sqlite(url):
        return ThreadedSQLiteHotPath(url, busy_timeout_ms=busy_timeout_ms)
    return AsyncHotPath(engine)

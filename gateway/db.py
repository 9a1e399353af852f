"""The async SQL engine, with the durability settings the audit trail needs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_pragmas(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    """A `connect` listener that gives every SQLite connection the audit settings."""

    def set_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # WAL lets key look-ups and /readyz read while the audit writer writes;
        # synchronous=FULL makes every commit durable (fsync), which is what
        # "the audit record is durable before the engine sees the call" means.
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache (the default is 2 MiB): verification and audit
        # queries scan the audit table's indexes, which outgrow 2 MiB within
        # ~50,000 records (bench/audit_throughput.py). The gateway's own audit
        # writer sets a smaller one (gateway.hotpath.WRITER_CACHE_KIB).
        cur.execute("PRAGMA cache_size=-65536")
        cur.close()

    return set_pragmas


def create_engine(url: str, *, sqlite_busy_timeout_ms: int = 5000, pool_size: int = 10) -> AsyncEngine:
    if not is_sqlite(url):
        return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    engine = create_async_engine(url)
    event.listen(engine.sync_engine, "connect", sqlite_pragmas(sqlite_busy_timeout_ms))
    return engine


T = TypeVar("T")


def run_with_engine(url: str, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run `work` on an event loop and engine of its own, then dispose of the
    engine: a CLI command, or verification on a worker thread or process."""

    async def go() -> T:
        engine = create_engine(url)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())

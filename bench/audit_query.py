"""Auditor queries on a large trail: 10 million records in PostgreSQL.

Fills a fresh database (migrated to head, so the indexes are the migration's)
with N synthetic records spread over a year, 1,000 keys, 50 teams and 5 models,
then times the auditor API's own query code (gateway.audit.query.page): the
first page of a filtered query and the next pages through the keyset cursor,
against an unfiltered page of the same size as the baseline. Target (issue 9):
the first page and every next page under 200 ms. Prints the plan PostgreSQL
chose, to show the index doing the work.

    .venv/bin/python bench/audit_query.py [--records 10000000] [--pages 5] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from gateway import migrate  # noqa: E402
from gateway.audit import query  # noqa: E402
from gateway.db import create_engine  # noqa: E402
from gateway.tables import audit_records  # noqa: E402

PG_ADMIN = os.environ.get("BASTION_BENCH_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
YEAR = 365 * 24 * 3600

FILL = """
INSERT INTO audit_records (stream_id, seq, prev_hash, record_hash, request_id, phase, started_at, ended_at,
    auth_method, key_id, key_name, team, role, client_addr, method, route, model, stream, outcome, http_status,
    prompt_tokens, completion_tokens, latency_ms, request_sha256, response_sha256, capture)
SELECT 'bench', g, md5((g - 1)::text) || md5((g - 1)::text), md5(g::text) || md5(g::text), md5(g::text),
    CASE WHEN g % 2 = 0 THEN 'final' ELSE 'intent' END,
    CAST(:start AS timestamptz) + (g * CAST(:step AS bigint)) * interval '1 microsecond',
    CAST(:start AS timestamptz) + (g * CAST(:step AS bigint) + 15000) * interval '1 microsecond',
    'api_key', 'key' || lpad((g % 1000)::text, 9, '0'), 'bench', 'team-' || (g % 50), 'user', '10.0.0.1',
    'POST', '/v1/chat/completions', 'model-' || (g % 5), false,
    CASE WHEN g % 97 = 0 THEN 'refused' ELSE 'ok' END, CASE WHEN g % 97 = 0 THEN 429 ELSE 200 END,
    12, 8, 13.5, md5(g::text) || md5(g::text), md5(g::text) || md5(g::text), 'hash'
FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS g
"""


async def fill(url: str, records: int, start: datetime) -> float:
    """Bulk-load with the indexes dropped, then rebuild them exactly as declared."""
    engine = create_engine(url)
    indexes = list(audit_records.indexes)
    t0 = time.perf_counter()
    async with engine.begin() as conn:
        for index in indexes:
            await conn.run_sync(lambda c, i=index: i.drop(c))
    step = YEAR * 1_000_000 // records
    chunk = 1_000_000
    for lo in range(1, records + 1, chunk):
        async with engine.begin() as conn:
            params = {"start": start, "step": step, "lo": lo, "hi": min(records, lo + chunk - 1)}
            await conn.execute(sa.text(FILL), params)
        print(f"  {min(records, lo + chunk - 1):,} records", flush=True)
    async with engine.begin() as conn:
        for index in indexes:
            await conn.run_sync(lambda c, i=index: i.create(c))
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(sa.text("VACUUM ANALYZE audit_records"))
    await engine.dispose()
    return time.perf_counter() - t0


async def walk(engine: object, f: query.EventFilter, pages: int) -> list[float]:
    """Milliseconds for the first page and each next page (100 records each)."""
    times: list[float] = []
    cursor = None
    for _ in range(pages + 1):
        t0 = time.perf_counter()
        page = await query.page(engine, f, limit=100, cursor=cursor)  # type: ignore[arg-type]
        times.append((time.perf_counter() - t0) * 1000)
        cursor = page.next_cursor
        if cursor is None:
            break
    return times


async def measure(url: str, start: datetime, pages: int, repeats: int) -> None:
    engine = create_engine(url)
    day = start + timedelta(days=200)
    scenarios = {
        "unfiltered (baseline)": query.EventFilter(),
        "by key": query.EventFilter(key_id="key000000417"),
        "by model": query.EventFilter(model="model-3"),
        "by team": query.EventFilter(team="team-17"),
        "by time range (one day)": query.EventFilter(since=day, until=day + timedelta(days=1)),
        "by key and time range (30 days)": query.EventFilter(
            key_id="key000000417", since=day, until=day + timedelta(days=30)
        ),
        "by status (rare: 429)": query.EventFilter(status=429),
    }
    print("\n| query | first page p50 | first page max | next pages p50 | next pages max | next pages walked |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, f in scenarios.items():
        firsts: list[float] = []
        nexts: list[float] = []
        for _ in range(repeats):
            times = await walk(engine, f, pages)
            firsts.append(times[0])
            nexts += times[1:]
        walked = len(nexts) // repeats
        later = f"{statistics.median(nexts):.1f} ms | {max(nexts):.1f} ms" if nexts else "- | -"
        print(f"| {name} | {statistics.median(firsts):.1f} ms | {max(firsts):.1f} ms | {later} | {walked} |")
    async with engine.connect() as conn:
        c = audit_records.c
        q = (
            sa.select(audit_records)
            .where(c.key_id == "key000000417")
            .order_by(c.started_at.desc(), c.id.desc())
            .limit(101)
        )
        compiled = q.compile(engine.sync_engine, compile_kwargs={"literal_binds": True})
        plan = (await conn.execute(sa.text(f"EXPLAIN (ANALYZE, BUFFERS) {compiled}"))).scalars().all()
    print("\nplan of the first page by key:\n    " + "\n    ".join(plan))
    await engine.dispose()


async def admin(sql: str) -> None:
    engine = create_engine(PG_ADMIN).execution_options(isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(sa.text(sql))
    await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--pages", type=int, default=5, help="next pages walked after the first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the database (its name is printed)")
    parser.add_argument("--reuse", default=None, help="measure an existing database kept by --keep")
    args = parser.parse_args()
    start = datetime(2025, 11, 1, tzinfo=UTC)
    name = args.reuse or f"bastion_bench_query_{secrets.token_hex(3)}"
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    if not args.reuse:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        if not args.reuse:
            migrate.upgrade(url)
            print(f"filling {name} with {args.records:,} records")
            seconds = asyncio.run(fill(url, args.records, start))
            print(f"filled and indexed in {seconds:.0f} s")
        asyncio.run(measure(url, start, args.pages, args.repeats))
    finally:
        if args.keep or args.reuse:
            print(f"\nkept database {name}")
        else:
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()

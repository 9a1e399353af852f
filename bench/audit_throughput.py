"""Audit write throughput with the hash chain and signed checkpoints, against the
same writes without them, in one run; then `audit verify` speed over what was written.

Many concurrent callers each `await writer.write(record)` in a loop (what
gateway calls do), through the gateway's own AuditWriter and hot path, into a
fresh database per side. "plain" is the same writer with a chain that adds
nothing (no hashes, no checkpoints): the baseline. Targets (issue 9): chained
records at least 10,000/s into SQLite and 5,000/s into PostgreSQL; verify at
least 100,000 records/s.

    .venv/bin/python bench/audit_throughput.py [--db sqlite|postgres|both] [--records 100000] [--callers 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from engine.manifest import create_signing_key  # noqa: E402
from gateway import migrate  # noqa: E402
from gateway.audit.anchor import AnchorFile  # noqa: E402
from gateway.audit.chain import Chain, Link, Signer  # noqa: E402
from gateway.audit.record import AuditRecord  # noqa: E402
from gateway.audit.verify import verify_database  # noqa: E402
from gateway.audit.writer import AuditWriter  # noqa: E402
from gateway.db import create_engine  # noqa: E402
from gateway.hotpath import hot_path_for  # noqa: E402

PG_ADMIN = os.environ.get("BASTION_BENCH_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


class PlainChain(Chain):
    """The baseline: rows go in as they are; no hash, no link, no checkpoint."""

    def link(self, rows: list[dict[str, Any]], *, closing: bool = False) -> Link:
        return Link(rows, [], self.seq, self.head)

    def seconds_until_checkpoint(self) -> float | None:
        return None


@dataclass
class Result:
    records: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def record(i: int, run: str) -> AuditRecord:
    """Records come in pairs, as calls write them: intent (even i), then final of the same request."""
    now = datetime.now(UTC)
    return AuditRecord(
        request_id=f"{run}{i // 2:016x}",
        phase="final" if i % 2 else "intent",
        started_at=now,
        ended_at=now,
        method="POST",
        route="/v1/chat/completions",
        auth_method="api_key",
        key_id=f"key{i % 50:09d}",
        key_name="bench",
        team=f"team-{i % 7}",
        role="user",
        client_addr="127.0.0.1",
        model="tiny",
        outcome="ok",
        http_status=200,
        prompt_tokens=12,
        completion_tokens=8,
        latency_ms=13.5,
        request_sha256=secrets.token_hex(32),
        response_sha256=secrets.token_hex(32),
        capture="hash",
    )


async def write_load(
    url: str, signer: Signer, anchor: AnchorFile, *, chained: bool, records: int, callers: int
) -> Result:
    engine = create_engine(url)
    hot = hot_path_for(url, engine, busy_timeout_ms=5000)
    chain_type = Chain if chained else PlainChain
    chain = chain_type(secrets.token_hex(16), signer, checkpoint_every=1000, checkpoint_seconds=10.0)
    writer = AuditWriter(hot, chain, anchor, queue_max=callers * 2, batch_max=512)
    await writer.start()
    per_caller = records // callers
    per_caller -= per_caller % 2  # each caller writes whole intent/final pairs, in order
    run = secrets.token_hex(8)
    made = [record(i, run) for i in range(per_caller * callers)]

    async def caller(c: int) -> None:
        for i in range(per_caller):
            await writer.write(made[c * per_caller + i])

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    seconds = time.perf_counter() - t0
    await writer.close()
    await hot.close()
    await engine.dispose()
    return Result(per_caller * callers, seconds)


async def fresh_database(kind: str, folder: Path, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{folder / (name + '.db')}"
    admin = create_engine(PG_ADMIN).execution_options(isolation_level="AUTOCOMMIT")
    db = f"bastion_bench_{name}_{secrets.token_hex(3)}"
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
    await admin.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + db


async def drop_database(url: str) -> None:
    if url.startswith("sqlite"):
        return
    admin = create_engine(PG_ADMIN).execution_options(isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    await admin.dispose()


def run(kind: str, args: argparse.Namespace, folder: Path, signer: Signer) -> dict[str, Any]:
    urls = {side: asyncio.run(fresh_database(kind, folder, side)) for side in ("plain", "chained")}
    try:
        for url in urls.values():
            migrate.upgrade(url)
        results: dict[str, list[Result]] = {"plain": [], "chained": []}
        anchor = AnchorFile(folder / f"{kind}-anchor.jsonl")
        for _ in range(args.rounds):  # alternate the sides: the machine's noise hits both
            for side in ("plain", "chained"):
                results[side].append(
                    asyncio.run(
                        write_load(
                            urls[side],
                            signer,
                            anchor,
                            chained=side == "chained",
                            records=args.records,
                            callers=args.callers,
                        )
                    )
                )
        trusted = {signer.key_id: signer.key.public_key()}
        reports = [verify_database(urls["chained"], trusted, anchor) for _ in range(args.rounds + 1)]
        assert all(r.intact and not r.incomplete_calls for r in reports), reports[0].public()
        report = min(reports, key=lambda r: r.seconds)
        best = {side: max(r.rate for r in rs) for side, rs in results.items()}
        return {
            "db": kind,
            "plain_rps": best["plain"],
            "chained_rps": best["chained"],
            "ratio": best["chained"] / best["plain"],
            "verify_records": report.records,
            "verify_rps": report.records / report.seconds,
        }
    finally:
        for url in urls.values():
            asyncio.run(drop_database(url))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--records", type=int, default=100_000, help="records per round and side")
    parser.add_argument("--callers", type=int, default=2048, help="concurrent writers (closed loop)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bastion-audit-bench-"))
    create_signing_key(folder / "audit.key")
    signer = Signer.load(folder / "audit.key")
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    rows = [run(kind, args, folder, signer) for kind in kinds]
    print(f"\n{args.records} records per side and round, {args.callers} concurrent writers, best of {args.rounds}")
    print(f"verify: the whole chained trail, best of {args.rounds + 1}\n")
    print("| database | plain records/s | chained + checkpoints records/s | ratio | verify records/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['db']} | {r['plain_rps']:,.0f} | {r['chained_rps']:,.0f} | {r['ratio']:.3f} |"
            f" {r['verify_rps']:,.0f} ({r['verify_records']:,} records) |"
        )


if __name__ == "__main__":
    main()

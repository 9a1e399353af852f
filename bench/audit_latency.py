"""One durable audit write at a time: the gateway's writer against the bare driver, in one run.

At concurrency 1 a call waits for two writes (its intent, committed, and its
final record, synced to disk), one after the other, so what each costs beyond
the disk's own commit is latency every call pays. This sends records one at a time through the
gateway's AuditWriter and SQLite hot path (chain link, writer task, commit with
fsync on the event loop, the caller's future answered) and, into
a second database in the same run, the same rows inserted and committed by the
sqlite3 driver on the calling thread (the floor: the same statement and the same
fsync, with nothing around them). Rounds alternate the two so machine noise
hits both. Prints p50 latency and CPU time per write for each, and the
writer's overhead over the floor.

    .venv/bin/python bench/audit_latency.py [--writes 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_throughput import record  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from engine.manifest import key_id_of  # noqa: E402
from gateway import migrate  # noqa: E402
from gateway.audit.anchor import AnchorFile  # noqa: E402
from gateway.audit.chain import Chain, Signer  # noqa: E402
from gateway.audit.record import hash_row, row_of  # noqa: E402
from gateway.audit.writer import AuditWriter  # noqa: E402
from gateway.db import create_engine, sqlite_pragmas  # noqa: E402
from gateway.hotpath import _sqlite_insert, hot_path_for  # noqa: E402
from gateway.tables import audit_records  # noqa: E402

WARMUP = 50


async def through_writer(url: str, signer: Signer, anchor: AnchorFile, writes: int) -> tuple[float, float]:
    """(p50 ms, CPU ms) per write through the gateway's writer."""
    engine = create_engine(url)
    hot = hot_path_for(url, engine, busy_timeout_ms=5000)
    writer = AuditWriter(hot, Chain(secrets.token_hex(16), signer, 1000, 10.0), anchor, queue_max=16, batch_max=512)
    await writer.start()
    run = secrets.token_hex(8)
    made = [record(i, run) for i in range(writes + WARMUP)]
    for r in made[:WARMUP]:
        await writer.write(r)
    latencies = []
    cpu = time.process_time()
    for r in made[WARMUP:]:
        t = time.perf_counter()
        await writer.write(r)
        latencies.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    await writer.close()
    await hot.close()
    await engine.dispose()
    return statistics.median(latencies) * 1000, cpu / writes * 1000


def bare_driver(path: str, writes: int) -> tuple[float, float]:
    """(p50 ms, CPU ms) per write: the same rows, inserted and committed by the driver inline."""
    conn = sqlite3.connect(path)
    sqlite_pragmas(5000)(conn, None)
    run, stream = secrets.token_hex(8), secrets.token_hex(16)
    rows = [row_of(record(i, run)) for i in range(writes + WARMUP)]
    latencies = []
    cpu = 0.0
    for seq, row in enumerate(rows, 1):
        row.update(stream_id=stream, seq=seq, prev_hash="0" * 64)
        row["record_hash"] = hash_row(row)
        statement, params = _sqlite_insert(audit_records, [row])
        c, t = time.process_time(), time.perf_counter()
        with conn:
            conn.executemany(statement, params)
        if seq > WARMUP:
            latencies.append(time.perf_counter() - t)
            cpu += time.process_time() - c
    conn.close()
    return statistics.median(latencies) * 1000, cpu / writes * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bastion-audit-latency-"))
    key = Ed25519PrivateKey.generate()
    signer = Signer(key, key_id_of(key.public_key()))
    anchor = AnchorFile(folder / "anchor.jsonl")
    results: dict[str, list[tuple[float, float]]] = {"writer": [], "driver": []}
    for n in range(args.rounds):
        writer_url = f"sqlite+aiosqlite:///{folder / f'writer-{n}.db'}"
        driver_url = f"sqlite+aiosqlite:///{folder / f'driver-{n}.db'}"
        for url in (writer_url, driver_url):
            migrate.upgrade(url)
        results["writer"].append(uvloop.run(through_writer(writer_url, signer, anchor, args.writes)))
        results["driver"].append(bare_driver(driver_url.split(":///", 1)[1], args.writes))
    print(f"{args.writes} sequential durable writes per side per round, {args.rounds} rounds (medians of rounds)")
    med = {side: tuple(statistics.median(r[i] for r in rs) for i in (0, 1)) for side, rs in results.items()}
    for side, (p50, cpu) in med.items():
        print(f"  {side:7s} p50 {p50:.3f} ms   CPU {cpu:.3f} ms per write")
    print(f"  writer over driver: +{med['writer'][0] - med['driver'][0]:.3f} ms p50, "
          f"+{med['writer'][1] - med['driver'][1]:.3f} ms CPU per write")  # fmt: skip


if __name__ == "__main__":
    main()

"""Verify the audit trail: every stream's chain, its checkpoints, and the anchor.

For each stream the records are read in `seq` order and checked one by one:

- numbering: a gap means records were **deleted**; a repeated number, **inserted**;
- link: `prev_hash` must be the previous record's hash. When it is the hash of
  the record *two* back, the one in between was **inserted**; when it is the
  hash of a record that comes *later*, the order was changed (**reordered**);
  when it matches nothing, the previous record was **modified** (its hash redone);
- self: the record's hash, recomputed over its fields, must match (**modified**).

Then the signed checkpoints (from SQL and from the anchor file, each checked on
its own): a checkpoint key nobody trusts is an **unknown key**, a signature
that does not verify a **bad signature**, a checkpoint beyond the last record
means the tail was **truncated**, one whose hash differs from the record at its
seq means the records up to it were rewritten (**modified**), and records after
a `closed` checkpoint were **inserted**. A checkpoint in the anchor but not in
SQL was **deleted**. Records missing at a stream's start are fine only when a
signed prune (anchor) covers them.

An intent record without an outcome record is an *incomplete call* (the gateway
stopped mid-call), reported beside the result, not as tampering. Records after
the last checkpoint of a stream that did not close cleanly are *unanchored*:
the chain vouches for their order, but no signature yet for their existence.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import multiprocessing
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.anchor import AnchorError, AnchorFile
from gateway.audit.chain import Checkpoint, Prune, signature_valid
from gateway.audit.record import GENESIS, HASHED_FIELDS, canonical
from gateway.db import run_with_engine
from gateway.tables import audit_checkpoints, audit_records


class Kind(StrEnum):
    MODIFIED = "modified"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    ANCHOR_MISSING = "anchor_missing"


# When two findings share a seq, the more specific explanation wins.
_PRECEDENCE = {
    Kind.REORDERED: 0,
    Kind.INSERTED: 1,
    Kind.DELETED: 2,
    Kind.TRUNCATED: 3,
    Kind.MODIFIED: 4,
    Kind.UNKNOWN_KEY: 5,
    Kind.BAD_SIGNATURE: 6,
    Kind.ANCHOR_MISSING: 7,
}


@dataclass(frozen=True)
class Problem:
    stream_id: str
    seq: int
    kind: Kind
    detail: str

    def public(self) -> dict[str, Any]:
        return {"stream_id": self.stream_id, "seq": self.seq, "kind": str(self.kind), "detail": self.detail}


@dataclass
class StreamResult:
    stream_id: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    closed: bool = False
    unanchored: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def first_problem(self) -> Problem | None:
        return min(self.problems, key=lambda p: (p.seq, _PRECEDENCE[p.kind]), default=None)

    def public(self) -> dict[str, Any]:
        first = self.first_problem
        return {
            "stream_id": self.stream_id,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "checkpoints": self.checkpoints,
            "closed": self.closed,
            "unanchored_records": self.unanchored,
            "intact": first is None,
            "first_problem": first.public() if first else None,
            "problems": len(self.problems),
        }


@dataclass
class Report:
    streams: list[StreamResult]
    incomplete_calls: list[str]
    records: int
    seconds: float
    trail_problems: list[Problem] = field(default_factory=list)  # not tied to one stream (the anchor)
    legacy_records: int = 0  # rows from before the chain existed

    @property
    def intact(self) -> bool:
        return not self.trail_problems and all(not s.problems for s in self.streams)

    def public(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "records": self.records,
            "streams": [s.public() for s in self.streams],
            "problems": [p.public() for p in self.trail_problems],
            "incomplete_calls": self.incomplete_calls,
            "legacy_unchained_records": self.legacy_records,
            "seconds": round(self.seconds, 3),
            "records_per_second": round(self.records / self.seconds) if self.seconds > 0 else None,
        }


@dataclass
class _Signed:
    """Checkpoints and prunes of one stream, each checked on its own."""

    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)  # valid ones, by seq
    sql_seqs: set[int] = field(default_factory=set)
    anchor_seqs: set[int] = field(default_factory=set)
    pruned_through: int = 0


def _check_signed(
    stream_id: str,
    sql: Iterable[Checkpoint],
    anchored: Iterable[Checkpoint],
    prunes: Iterable[Prune],
    trusted: dict[str, Ed25519PublicKey],
    problems: list[Problem],
) -> _Signed:
    signed = _Signed()

    def valid(item: Checkpoint | Prune, seq: int, where: str) -> bool:
        key = trusted.get(item.key_id)
        if key is None:
            problems.append(Problem(stream_id, seq, Kind.UNKNOWN_KEY, f"{where} signed by untrusted key {item.key_id}"))
            return False
        if not signature_valid(item, key):
            problems.append(Problem(stream_id, seq, Kind.BAD_SIGNATURE, f"{where} signature does not verify"))
            return False
        return True

    for source, items, seqs in (
        ("checkpoint", sql, signed.sql_seqs),
        ("anchored checkpoint", anchored, signed.anchor_seqs),
    ):
        for cp in items:
            seqs.add(cp.seq)
            if not valid(cp, cp.seq, source):
                continue
            known = signed.checkpoints.get(cp.seq)
            if known is not None and (known.record_hash, known.closed) != (cp.record_hash, cp.closed):
                problems.append(Problem(stream_id, cp.seq, Kind.MODIFIED, "two signed checkpoints disagree"))
            signed.checkpoints.setdefault(cp.seq, cp)
    for prune in prunes:
        if valid(prune, prune.through, "prune"):
            signed.pruned_through = max(signed.pruned_through, prune.through)
    for seq in sorted(signed.anchor_seqs - signed.sql_seqs):
        if seq >= signed.pruned_through:  # below a signed prune point it was removed on purpose
            problems.append(Problem(stream_id, seq, Kind.DELETED, "checkpoint in the anchor but not in the database"))
    return signed


class StreamVerifier:
    """Check one stream, fed its records in seq order: `add(rows)` run by run, then `finish()`.

    A row is (*HASHED_FIELDS values, record_hash). Memory stays flat however
    long the stream: only the last two hashes and open findings are kept.
    """

    _SEQ, _PREV, _HASH = HASHED_FIELDS.index("seq"), HASHED_FIELDS.index("prev_hash"), len(HASHED_FIELDS)
    _REQUEST, _PHASE = HASHED_FIELDS.index("request_id"), HASHED_FIELDS.index("phase")

    def __init__(
        self,
        stream_id: str,
        *,
        trusted: dict[str, Ed25519PublicKey],
        sql_checkpoints: Iterable[Checkpoint] = (),
        anchor_checkpoints: Iterable[Checkpoint] = (),
        prunes: Iterable[Prune] = (),
    ):
        self.result = StreamResult(stream_id)
        self._signed = _check_signed(
            stream_id, sql_checkpoints, anchor_checkpoints, prunes, trusted, self.result.problems
        )
        self.result.checkpoints = len(self._signed.checkpoints)
        # Where the chain starts: at 1, or just after a signed prune point.
        self._start = self._signed.pruned_through
        self._base = self._signed.checkpoints.get(self._start)
        self._expected_seq = self._start + 1
        self._expected_prev: str | None = (
            GENESIS if self._start == 0 else (self._base.record_hash if self._base else None)
        )
        self._before_prev: str | None = None  # the hash two back, to recognise an inserted record
        self._stored_at: dict[int, str] = {}  # stored hashes at checkpointed seqs
        self._unexplained: dict[str, int] = {}  # prev_hash values that matched nothing yet -> seq
        self.open_intents: set[str] = set()
        self._last_hash: str | None = None

    def _problem(self, seq: int, kind: Kind, detail: str) -> None:
        self.result.problems.append(Problem(self.result.stream_id, seq, kind, detail))

    def add(self, rows: Sequence[Sequence[Any]]) -> None:
        """Check a run of this stream's records, in seq order. The state lives in
        locals for the run (this loop is the verifier's speed: bench/audit_throughput.py)."""
        i_seq, i_prev, i_hash, i_phase, i_request = self._SEQ, self._PREV, self._HASH, self._PHASE, self._REQUEST
        start, checkpointed, stored_at = self._start, self._signed.checkpoints, self._stored_at
        unexplained, intents, problem = self._unexplained, self.open_intents, self._problem
        expected_seq, expected_prev, before_prev = self._expected_seq, self._expected_prev, self._before_prev
        r = self.result
        sha256 = hashlib.sha256
        counted = 0
        for row in rows:
            seq, prev, stored = row[i_seq], row[i_prev], row[i_hash]
            if seq <= start:
                continue  # left behind by a prune that stopped half-way: outside the verified range
            counted += 1
            if r.first_seq is None:
                r.first_seq = seq
            if unexplained and stored in unexplained:  # an earlier link pointed forward to this record
                problem(unexplained.pop(stored), Kind.REORDERED, "records out of order")
            if seq != expected_seq:
                if seq > expected_seq:
                    problem(expected_seq, Kind.DELETED, f"records {expected_seq}..{seq - 1} are missing")
                else:
                    problem(seq, Kind.INSERTED, "sequence number repeats")
            elif prev != expected_prev and expected_prev is not None:
                if prev == before_prev:
                    problem(seq - 1, Kind.INSERTED, "record not linked from its successor")
                else:
                    unexplained[prev] = seq
            if sha256(canonical(row[:i_hash])).hexdigest() != stored:
                problem(seq, Kind.MODIFIED, "record hash does not match its fields")
            if seq in checkpointed:
                stored_at[seq] = stored
            phase = row[i_phase]
            if phase == "intent":
                intents.add(row[i_request])
            elif phase == "final":
                intents.discard(row[i_request])
            before_prev, expected_prev = expected_prev, stored
            if seq >= expected_seq:
                expected_seq = seq + 1
            r.last_seq = seq
        r.records += counted
        self._expected_seq, self._expected_prev, self._before_prev = expected_seq, expected_prev, before_prev
        self._last_hash = expected_prev

    def finish(self) -> StreamResult:
        r, signed = self.result, self._signed
        for seq in self._unexplained.values():
            self._problem(seq - 1, Kind.MODIFIED, f"record {seq - 1} changed: its successor's link breaks")
        last = r.last_seq if r.last_seq is not None else self._start
        if self._start > 0 and self._base is None:
            self._problem(self._start, Kind.DELETED, "no signed checkpoint at the prune point")
        for seq, cp in sorted(signed.checkpoints.items()):
            if seq <= self._start:
                continue
            if seq > last:
                self._problem(last + 1, Kind.TRUNCATED, f"checkpoint at {seq} but the stream ends at {last}")
                break
            if seq in self._stored_at and self._stored_at[seq] != cp.record_hash:
                self._problem(seq, Kind.MODIFIED, "records up to this checkpoint were rewritten")
            if cp.closed and last > seq:
                self._problem(seq + 1, Kind.INSERTED, "records after the stream was closed")
        final = signed.checkpoints.get(max(signed.checkpoints, default=-1))
        r.closed = bool(final and final.closed and final.seq == last and final.record_hash == self._last_hash)
        r.unanchored = 0 if r.closed else max(0, last - max(signed.checkpoints, default=0))
        return r


# ----------------------------------------------------------------- reading SQL

_RECORD_COLUMNS = [*HASHED_FIELDS, "record_hash"]
_CHECKPOINT_COLUMNS = [audit_checkpoints.c[name] for name in Checkpoint.__struct_fields__]


def _records_sql(time_text: str, only: str = "") -> str:
    """The record columns in hash order, times turned into the canonical text by
    the database itself (`time_text` formats `{}`; NULL stays NULL): no Python
    datetime is built per row. A time stored in any other form than the writer's
    no longer matches its hash, which is right: the row was changed."""
    columns = [time_text.format(c) if c in ("started_at", "ended_at") else c for c in _RECORD_COLUMNS]
    return (
        f"SELECT {', '.join(columns)} FROM audit_records"  # noqa: S608 - fixed column names
        f" WHERE stream_id IS NOT NULL {only} ORDER BY stream_id, seq"
    )


# SQLite holds SQLAlchemy's text form `2026-11-24 23:45:12.123456` (UTC).
_SQLITE_TIME = "replace({0}, ' ', 'T') || 'Z'"
_PG_TIME = """to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


async def _sqlite_pages(path: str, chunk: int, streams: Sequence[str] | None) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Straight from the sqlite3 driver in one read transaction (one snapshot);
    SQLAlchemy's per-row processing halved the rate (bench/audit_throughput.py)."""
    only = f"AND stream_id IN ({', '.join('?' * len(streams))})" if streams else ""
    conn = await asyncio.to_thread(sqlite3.connect, path, check_same_thread=False)
    try:
        cursor = await asyncio.to_thread(conn.execute, _records_sql(_SQLITE_TIME, only), tuple(streams or ()))
        following = asyncio.create_task(asyncio.to_thread(cursor.fetchmany, chunk))
        while rows := await following:
            following = asyncio.create_task(asyncio.to_thread(cursor.fetchmany, chunk))
            yield rows
    finally:
        await asyncio.to_thread(conn.close)


async def _pg_pages(
    engine: AsyncEngine, chunk: int, streams: Sequence[str] | None
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """A server-side cursor on asyncpg itself, in one repeatable-read snapshot
    (SQLAlchemy's row processing cost a third of the rate)."""
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        async with raw.transaction(isolation="repeatable_read", readonly=True):
            # PostgreSQL's JIT compiles this whole-table query's expressions on
            # every run; off, the verifier went from 88k to 103k-112k records/s.
            await raw.execute("SET LOCAL jit = off")
            if streams:
                cursor = await raw.cursor(_records_sql(_PG_TIME, "AND stream_id = ANY($1::varchar[])"), list(streams))
            else:
                cursor = await raw.cursor(_records_sql(_PG_TIME))
            # The server produces the next page while this one is hashed.
            following = asyncio.create_task(cursor.fetch(chunk))
            try:
                while rows := await following:
                    following = asyncio.create_task(cursor.fetch(chunk))
                    yield rows
            finally:
                following.cancel()


def _records(
    engine: AsyncEngine, streams: Sequence[str] | None = None, chunk: int = 2000
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Every chained record (of `streams`, or all), ordered by (stream, seq), page by page."""
    if engine.dialect.name == "sqlite":
        assert engine.url.database
        return _sqlite_pages(engine.url.database, chunk, streams)
    return _pg_pages(engine, chunk, streams)


@dataclass(frozen=True)
class _TrailSigned:
    """What a stream's verifier needs besides its records (picklable, for worker processes)."""

    sql: dict[str, list[Checkpoint]]
    anchored: dict[str, list[Checkpoint]]
    prunes: dict[str, list[Prune]]
    trusted: dict[str, bytes]  # raw Ed25519 public keys by key id

    def verifier(self, stream_id: str, trusted: dict[str, Ed25519PublicKey]) -> StreamVerifier:
        return StreamVerifier(
            stream_id,
            trusted=trusted,
            sql_checkpoints=self.sql.get(stream_id, ()),
            anchor_checkpoints=self.anchored.get(stream_id, ()),
            prunes=self.prunes.get(stream_id, ()),
        )


async def _check_records(
    engine: AsyncEngine, signed: _TrailSigned, streams: Sequence[str] | None = None
) -> tuple[list[StreamResult], set[str]]:
    """Feed every record (of `streams`, or all) to its stream's verifier."""
    trusted = {k: Ed25519PublicKey.from_public_bytes(v) for k, v in signed.trusted.items()}
    results: list[StreamResult] = []
    incomplete: set[str] = set()
    i_stream = HASHED_FIELDS.index("stream_id")
    current: StreamVerifier | None = None

    def done(v: StreamVerifier) -> None:
        results.append(v.finish())
        incomplete.update(v.open_intents)

    # Records arrive in (stream, seq) order and are checked as they stream past.
    async for rows in _records(engine, streams):
        # Hand each run of one stream's rows to that stream's verifier.
        begin = 0
        while begin < len(rows):
            stream_id = rows[begin][i_stream]
            end = bisect.bisect_right(rows, stream_id, lo=begin, key=itemgetter(i_stream))
            if current is None or stream_id != current.result.stream_id:
                if current is not None:
                    done(current)
                current = signed.verifier(stream_id, trusted)
            current.add(rows[begin:end])
            begin = end
    if current is not None:
        done(current)
    return results, incomplete


def _check_in_process(url: str, signed: _TrailSigned, streams: list[str]) -> tuple[list[StreamResult], set[str]]:
    """A worker process's share: some streams."""
    return run_with_engine(url, lambda engine: _check_records(engine, signed, streams))


# Below this many records (estimated from the checkpoints) starting processes costs more than it saves.
PARALLEL_MIN_RECORDS = 100_000


def _shares(sizes: dict[str, int], workers: int) -> list[list[str]]:
    """Streams split into `workers` lists of about equal records (largest first, to the lightest)."""
    shares: list[list[str]] = [[] for _ in range(workers)]
    load = [0] * workers
    for stream_id, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        i = load.index(min(load))
        shares[i].append(stream_id)
        load[i] += size
    return [s for s in shares if s]


async def verify_trail(engine: AsyncEngine, trusted: dict[str, Ed25519PublicKey], anchor: AnchorFile | None) -> Report:
    """Verify every stream in the database (and every stream the anchor knows).

    Read order matters on a live trail: the anchor first, then the SQL
    checkpoints, then the records. Each is written after the one before it
    (records, then their checkpoint row, then its anchor line), so everything
    read earlier is already present in what is read later, and a checkpoint
    committed meanwhile cannot look like a deletion or a truncation.
    """
    t0 = time.perf_counter()
    trail_problems: list[Problem] = []
    anchored: list[Checkpoint] = []
    prunes: list[Prune] = []
    anchor_error: str | None = None
    if anchor is not None:
        try:
            anchored, prunes, bad_lines = anchor.read()
        except AnchorError as exc:
            anchor_error, bad_lines = str(exc), []
        trail_problems += [Problem("-", 0, Kind.ANCHOR_MISSING, f"unreadable anchor {b}") for b in bad_lines]
    async with engine.connect() as conn:
        cps = [Checkpoint(**row._mapping) for row in (await conn.execute(sa.select(*_CHECKPOINT_COLUMNS))).all()]
        legacy = (
            await conn.execute(sa.select(sa.func.count()).where(audit_records.c.stream_id.is_(None)))
        ).scalar_one()
    if anchor_error and cps:
        trail_problems.append(Problem("-", 0, Kind.ANCHOR_MISSING, anchor_error))

    def by_stream(items: Iterable[Any]) -> dict[str, list[Any]]:
        grouped: dict[str, list[Any]] = {}
        for item in items:
            grouped.setdefault(item.stream_id, []).append(item)
        return grouped

    raw = {k: v.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for k, v in trusted.items()}
    signed = _TrailSigned(by_stream(cps), by_stream(anchored), by_stream(prunes), raw)
    # Each stream verifies on its own, so a trail of many streams (every gateway
    # worker, restart and CLI command writes one) is split across processes.
    sizes = {sid: max(cp.seq for cp in items) for sid, items in signed.sql.items()}
    workers = min(os.cpu_count() or 1, len(sizes))
    if workers > 1 and sum(sizes.values()) >= PARALLEL_MIN_RECORDS:
        async with engine.connect() as conn:
            present = (await conn.execute(sa.select(audit_records.c.stream_id).distinct())).scalars().all()
        sizes |= {sid: 0 for sid in present if sid is not None and sid not in sizes}
        url = engine.url.render_as_string(hide_password=False)
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, _check_in_process, url, signed, share)
                    for share in _shares(sizes, workers)
                )
            )
    else:
        parts = [await _check_records(engine, signed)]
    results = {r.stream_id: r for part, _ in parts for r in part}
    incomplete = {rid for _, part in parts for rid in part}
    known = set(signed.sql) | set(signed.anchored) | set(signed.prunes)
    for stream_id in sorted(known - set(results)):
        results[stream_id] = signed.verifier(stream_id, trusted).finish()
    streams = sorted(results.values(), key=lambda r: r.stream_id)
    return Report(
        streams=streams,
        incomplete_calls=sorted(incomplete),
        records=sum(s.records for s in streams),
        seconds=time.perf_counter() - t0,
        trail_problems=trail_problems,
        legacy_records=legacy,
    )


def verify_database(url: str, trusted: dict[str, Ed25519PublicKey], anchor: AnchorFile | None) -> Report:
    """Verify on a loop and engine of its own (the CLI, and the API from a worker thread)."""
    return run_with_engine(url, lambda engine: verify_trail(engine, trusted, anchor))

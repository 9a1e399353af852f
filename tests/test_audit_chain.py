"""The hash chain and its checkpoints catch every kind of tampering, on SQLite and PostgreSQL.

Each test writes a real trail through the gateway's own AuditWriter into a real
database, changes it the way an attacker with database access would (plain
SQL), and checks that verification names the right kind at the right seq.
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import resource
import secrets
import signal
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine import manifest
from gateway import migrate
from gateway.audit.anchor import AnchorError, AnchorFile
from gateway.audit.chain import Checkpoint, Signer
from gateway.audit.prune import prune
from gateway.audit.record import AuditRecord, hash_row
from gateway.audit.verify import Kind, Report, verify_trail
from gateway.audit.writer import AuditWriter
from gateway.db import create_engine
from gateway.hotpath import hot_path_for
from gateway.tables import audit_checkpoints, audit_records

RECORDS = 45  # plus the closing record the writer adds: seqs 1..46
EVERY = 10  # checkpoints at 0, 10, 20, 30, 40 and the closing one at 46


class Trail:
    """A real trail in a real database, and the means to tamper with it."""

    def __init__(self, url: str, folder: Path):
        self.url = url
        self.anchor = AnchorFile(folder / "anchor.jsonl")
        key_file = folder / "audit.key"
        manifest.create_signing_key(key_file)
        self.signer = Signer.load(key_file)
        self.trusted: dict[str, Ed25519PublicKey] = {self.signer.key_id: self.signer.key.public_key()}
        self.stream_id = ""

    def write(self, n: int = RECORDS, *, close: bool = True) -> None:
        async def go() -> None:
            engine = create_engine(self.url)
            hot = hot_path_for(self.url, engine, busy_timeout_ms=5000)
            writer = AuditWriter.for_process(
                hot, self.signer, self.anchor, every=EVERY, seconds=3600, queue_max=1000, batch_max=7
            )
            self.stream_id = writer.stream_id
            await writer.start()
            now = datetime.now(UTC)
            for start in range(0, n, 9):  # groups of concurrent writes, so batches vary in size
                await asyncio.gather(
                    *(writer.write(record(i, now + timedelta(milliseconds=i))) for i in range(start, min(n, start + 9)))
                )
            if close:
                await writer.close()
            await hot.close()
            await engine.dispose()

        asyncio.run(go())

    def sql(self, *statements: str, **params: Any) -> None:
        async def go() -> None:
            engine = create_engine(self.url)
            try:
                async with engine.begin() as conn:
                    for statement in statements:
                        await conn.execute(sa.text(statement), {"s": self.stream_id, **params})
            finally:
                await engine.dispose()

        asyncio.run(go())

    def row(self, seq: int) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            engine = create_engine(self.url)
            try:
                async with engine.connect() as conn:
                    q = sa.select(audit_records).where(
                        audit_records.c.stream_id == self.stream_id, audit_records.c.seq == seq
                    )
                    return dict((await conn.execute(q)).one()._mapping)
            finally:
                await engine.dispose()

        return asyncio.run(go())

    def insert(self, row: dict[str, Any]) -> None:
        async def go() -> None:
            engine = create_engine(self.url)
            try:
                async with engine.begin() as conn:
                    await conn.execute(sa.insert(audit_records).values(**row))
            finally:
                await engine.dispose()

        asyncio.run(go())

    def checkpoint(self, seq: int) -> Checkpoint:
        async def go() -> Checkpoint:
            engine = create_engine(self.url)
            try:
                async with engine.connect() as conn:
                    cols = [audit_checkpoints.c[n] for n in Checkpoint.__struct_fields__]
                    q = sa.select(*cols).where(audit_checkpoints.c.seq == seq)
                    return Checkpoint(**(await conn.execute(q)).one()._mapping)
            finally:
                await engine.dispose()

        return asyncio.run(go())

    def verify(self, anchor: AnchorFile | None = None) -> Report:
        async def go() -> Report:
            engine = create_engine(self.url)
            try:
                return await verify_trail(engine, self.trusted, anchor or self.anchor)
            finally:
                await engine.dispose()

        return asyncio.run(go())

    def first_problem(self) -> tuple[Kind, int]:
        report = self.verify()
        assert not report.intact
        problem = report.streams[0].first_problem
        assert problem is not None, report.public()
        return problem.kind, problem.seq


def record(i: int, at: datetime) -> AuditRecord:
    return AuditRecord(
        request_id=f"req-{i:04d}",
        phase="final",
        started_at=at,
        ended_at=at + timedelta(milliseconds=5),
        method="POST",
        route="/v1/chat/completions",
        key_id="k" * 12,
        team="team-a",
        model="tiny",
        outcome="ok",
        http_status=200,
        prompt_tokens=10 + i,
        completion_tokens=i,
        latency_ms=5.25 + i / 7,
        request_sha256=secrets.token_hex(32),
        response_sha256=secrets.token_hex(32),
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def trail(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Trail]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
        migrate.upgrade(url)
    else:
        url = request.getfixturevalue("fresh_pg_url")
    t = Trail(url, tmp_path)
    t.write()
    yield t


def test_an_untouched_trail_verifies(trail: Trail) -> None:
    report = trail.verify()
    assert report.intact, report.public()
    (stream,) = report.streams
    assert (stream.records, stream.first_seq, stream.last_seq) == (RECORDS + 1, 1, RECORDS + 1)
    assert stream.closed and stream.unanchored == 0
    assert stream.checkpoints == 6  # 0, 10, 20, 30, 40, and the closing one at 46
    assert report.incomplete_calls == []


def test_an_edited_field_is_modified_at_its_seq(trail: Trail) -> None:
    trail.sql("UPDATE audit_records SET completion_tokens = 999 WHERE stream_id = :s AND seq = 17")
    assert trail.first_problem() == (Kind.MODIFIED, 17)


def test_an_edited_record_with_its_hash_redone_is_modified_at_its_seq(trail: Trail) -> None:
    row = trail.row(17)
    row.update(completion_tokens=999)
    trail.sql(
        "UPDATE audit_records SET completion_tokens = 999, record_hash = :h WHERE stream_id = :s AND seq = 17",
        h=hash_row(row),
    )
    assert trail.first_problem() == (Kind.MODIFIED, 17)


def test_a_deleted_middle_record_is_deleted_at_its_seq(trail: Trail) -> None:
    trail.sql("DELETE FROM audit_records WHERE stream_id = :s AND seq = 17")
    assert trail.first_problem() == (Kind.DELETED, 17)


def test_two_swapped_records_are_reordered(trail: Trail) -> None:
    trail.sql(
        "UPDATE audit_records SET seq = -1 WHERE stream_id = :s AND seq = 17",
        "UPDATE audit_records SET seq = 17 WHERE stream_id = :s AND seq = 23",
        "UPDATE audit_records SET seq = 23 WHERE stream_id = :s AND seq = -1",
    )
    assert trail.first_problem() == (Kind.REORDERED, 17)


def test_adjacent_swapped_records_are_reordered(trail: Trail) -> None:
    trail.sql(
        "UPDATE audit_records SET seq = -1 WHERE stream_id = :s AND seq = 17",
        "UPDATE audit_records SET seq = 17 WHERE stream_id = :s AND seq = 18",
        "UPDATE audit_records SET seq = 18 WHERE stream_id = :s AND seq = -1",
    )
    assert trail.first_problem() == (Kind.REORDERED, 17)


def test_a_forged_record_with_a_recomputed_hash_is_inserted(trail: Trail) -> None:
    # Make room after seq 17, then slip in a record that links to 17 and hashes correctly.
    trail.sql(
        "UPDATE audit_records SET seq = -(seq + 1) WHERE stream_id = :s AND seq > 17",
        "UPDATE audit_records SET seq = -seq WHERE stream_id = :s AND seq < 0",
    )
    forged = trail.row(17)
    forged.pop("id")
    forged.update(seq=18, prev_hash=forged["record_hash"], request_id="forged", completion_tokens=1)
    forged["record_hash"] = hash_row(forged)
    trail.insert(forged)
    assert trail.first_problem() == (Kind.INSERTED, 18)


def test_deleting_the_last_records_is_truncated(trail: Trail) -> None:
    trail.sql("DELETE FROM audit_records WHERE stream_id = :s AND seq > 41")
    assert trail.first_problem() == (Kind.TRUNCATED, 42)


def test_truncating_records_and_checkpoint_rows_is_still_caught_by_the_anchor(trail: Trail) -> None:
    trail.sql(
        "DELETE FROM audit_records WHERE stream_id = :s AND seq > 25",
        "DELETE FROM audit_checkpoints WHERE stream_id = :s AND seq > 25",
    )
    assert trail.first_problem() == (Kind.TRUNCATED, 26)


def test_a_replaced_checkpoint_signature_is_a_bad_signature(trail: Trail) -> None:
    forged = base64.b64encode(secrets.token_bytes(64)).decode()
    trail.sql("UPDATE audit_checkpoints SET signature = :sig WHERE stream_id = :s AND seq = 20", sig=forged)
    assert trail.first_problem() == (Kind.BAD_SIGNATURE, 20)


def test_a_checkpoint_signed_with_a_foreign_key_is_an_unknown_key(trail: Trail) -> None:
    cp = trail.checkpoint(20)
    foreign = Signer(Ed25519PrivateKey.generate(), "f" * 16)
    sig = foreign.sign(cp.message())
    trail.sql(
        "UPDATE audit_checkpoints SET key_id = :k, signature = :sig WHERE stream_id = :s AND seq = 20",
        k=foreign.key_id,
        sig=sig,
    )
    assert trail.first_problem() == (Kind.UNKNOWN_KEY, 20)


def test_a_record_appended_after_the_stream_closed_is_inserted(trail: Trail) -> None:
    last = trail.row(RECORDS + 1)
    last.pop("id")
    last.update(seq=RECORDS + 2, prev_hash=last["record_hash"], request_id="late")
    last["record_hash"] = hash_row(last)
    trail.insert(last)
    assert trail.first_problem() == (Kind.INSERTED, RECORDS + 2)


def test_a_lost_anchor_file_fails_verification(trail: Trail, tmp_path: Path) -> None:
    report = trail.verify(AnchorFile(tmp_path / "nowhere.jsonl"))
    assert not report.intact
    assert [p.kind for p in report.trail_problems] == [Kind.ANCHOR_MISSING]


def _points(stream_id: str, seqs: Iterable[int]) -> list[Checkpoint]:
    signed_at = datetime.now(UTC)
    return [
        Checkpoint(
            stream_id=stream_id,
            seq=seq,
            record_hash="ab" * 32,
            signed_at=signed_at,
            closed=False,
            key_id="k",
            signature="c2ln",
        )
        for seq in seqs
    ]


def _append_on_a_filling_disk(path: str, queue: Any, other_appended: Any) -> None:
    # A soft RLIMIT_FSIZE makes write(2) stop at 150 bytes, in the middle of
    # the first line, and refuse the next write (EFBIG), as a disk filling up
    # would; raising the limit again is the operator freeing space.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    anchor = AnchorFile(Path(path))
    points = _points("s", (10, 20, 30, 40))
    resource.setrlimit(resource.RLIMIT_FSIZE, (150, resource.RLIM_INFINITY))
    try:
        anchor.append(points[:3])
        refused = ""
    except AnchorError as exc:
        refused = str(exc)
    queue.put((refused, anchor.behind))
    other_appended.wait(30)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    anchor.append(points[3:])
    queue.put("done")


def test_an_append_cut_short_is_refused_and_written_whole_on_the_next(tmp_path: Path) -> None:
    # Counting a short write as done would answer calls whose checkpoints never
    # reached the anchor. Completing the torn line with the rest of its bytes
    # (as this once did) went wrong when another process appended in between:
    # its line was glued to the torn one and the rest landed as a line of its
    # own, three lines verify could not read, and the trail looked tampered.
    path = tmp_path / "anchor.jsonl"
    ctx = multiprocessing.get_context("fork")
    queue, other_appended = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_append_on_a_filling_disk, args=(str(path), queue, other_appended))
    child.start()
    refused, behind = queue.get(timeout=30)
    assert "File too large" in refused and behind
    assert not path.read_bytes().endswith(b"\n")  # the torn line
    AnchorFile(path).append(_points("other", (5,)))  # another worker's checkpoint
    other_appended.set()
    assert queue.get(timeout=30) == "done"
    child.join(timeout=30)
    checkpoints, _, bad = AnchorFile(path).read()
    assert bad == []
    assert sorted((c.stream_id, c.seq) for c in checkpoints) == [("other", 5)] + [("s", n) for n in (10, 20, 30, 40)]
    # A torn line that nothing completes is still reported.
    with path.open("ab") as f:
        f.write(b'{"type":"checkpoint","checkpoint":{"stream_id":"gone"')
    AnchorFile(path).append(_points("other", (6,)))
    assert len(AnchorFile(path).read()[2]) == 1


def test_pruning_whole_segments_keeps_the_trail_verifiable(trail: Trail) -> None:
    async def go() -> None:
        engine = create_engine(trail.url)
        try:
            pruned = await prune(engine, trail.signer, trail.anchor, datetime.now(UTC) + timedelta(days=1))
            # Each stream's closing checkpoint is its newest: everything up to it goes.
            assert sorted((p.through, p.records) for p in pruned) == [(13, 13), (RECORDS + 1, RECORDS + 1 - 20)]
        finally:
            await engine.dispose()

    cut = trail.checkpoint(20).signed_at + timedelta(microseconds=1)

    async def prune_through_20() -> None:
        engine = create_engine(trail.url)
        try:
            (pruned,) = await prune(engine, trail.signer, trail.anchor, cut)
            assert (pruned.through, pruned.records) == (20, 20)
        finally:
            await engine.dispose()

    asyncio.run(prune_through_20())
    report = trail.verify()
    assert report.intact, report.public()
    assert (report.streams[0].first_seq, report.streams[0].records) == (21, RECORDS + 1 - 20)

    trail.write(12, close=True)  # a second stream (seqs 1..13), pruned whole with the first
    asyncio.run(go())
    report = trail.verify()
    assert report.intact, report.public()
    assert report.records == 0


def test_deleting_the_oldest_records_without_a_signed_prune_is_deleted(trail: Trail) -> None:
    trail.sql(
        "DELETE FROM audit_records WHERE stream_id = :s AND seq <= 10",
        "DELETE FROM audit_checkpoints WHERE stream_id = :s AND seq < 10",
    )
    assert trail.first_problem() == (Kind.DELETED, 0)


def test_an_intent_without_outcome_is_an_incomplete_call_not_tampering(trail: Trail) -> None:
    async def go() -> None:
        engine = create_engine(trail.url)
        hot = hot_path_for(trail.url, engine, busy_timeout_ms=5000)
        writer = AuditWriter.for_process(
            hot, trail.signer, trail.anchor, every=5, seconds=3600, queue_max=10, batch_max=5
        )
        trail.stream_id = writer.stream_id
        await writer.start()
        now = datetime.now(UTC)
        await writer.write(
            AuditRecord(request_id="cut-off", phase="intent", started_at=now, method="POST", route="/v1/x")
        )
        # The process dies here: no outcome record, no closing checkpoint.
        writer._task.cancel()  # type: ignore[union-attr]
        await hot.close()
        await engine.dispose()

    asyncio.run(go())
    report = trail.verify()
    assert report.intact, report.public()
    assert report.incomplete_calls == ["cut-off"]
    crashed = next(s for s in report.streams if s.stream_id == trail.stream_id)
    assert not crashed.closed and crashed.unanchored == 1


def test_a_quiet_stream_is_checkpointed_after_checkpoint_seconds(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'quiet.db'}"
    migrate.upgrade(url)
    t = Trail(url, tmp_path)

    async def go() -> list[int]:
        engine = create_engine(url)
        hot = hot_path_for(url, engine, busy_timeout_ms=5000)
        writer = AuditWriter.for_process(hot, t.signer, t.anchor, every=1000, seconds=0.2, queue_max=10, batch_max=5)
        await writer.start()
        now = datetime.now(UTC)
        for i in range(3):
            await writer.write(record(i, now))
        # No more records come; the timed checkpoint must still cover the three.
        # Watched in the anchor, not the chain: the chain counts a checkpoint
        # once it is committed, and its anchor line is written after, in a thread.
        for _ in range(200):
            if len(seqs := [cp.seq for cp in t.anchor.read()[0]]) > 1:
                break
            await asyncio.sleep(0.05)
        writer._task.cancel()  # type: ignore[union-attr]  # die without the closing seal
        await hot.close()
        await engine.dispose()
        return seqs

    assert asyncio.run(go()) == [0, 3]
    report = t.verify()
    assert report.intact and report.streams[0].unanchored == 0 and not report.streams[0].closed


def test_streams_verified_in_worker_processes_give_the_same_findings(
    trail: Trail, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.audit import verify

    first = trail.stream_id
    trail.write(30)  # a second stream, so there is work to share out
    trail.stream_id = first
    trail.sql("DELETE FROM audit_records WHERE stream_id = :s AND seq = 17")
    inline = trail.verify()
    monkeypatch.setattr(verify, "PARALLEL_MIN_RECORDS", 0)
    shared = trail.verify()
    assert [s.public() for s in shared.streams] == [s.public() for s in inline.streams]
    broken = next(s for s in shared.streams if s.stream_id == first).first_problem
    assert broken is not None and (broken.kind, broken.seq) == (Kind.DELETED, 17)
    assert sorted(s.records for s in shared.streams) == [31, RECORDS]

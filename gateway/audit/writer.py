"""The audit writer: the one place audit records reach SQL.

Callers `await writer.write(record)` and get control back only once the record
is committed (durable), or an `AuditUnavailable` error when it cannot be. One
background task takes whatever records are waiting, chains them
(gateway.audit.chain), and commits them with any checkpoint that falls due in a
single transaction (group commit), so under load many calls share one fsync.
Checkpoints go to the anchor file before the batch's callers are answered.

`write(record, synced=False)` returns once the record is committed but before
it is flushed to disk: it survives the gateway process dying (the database has
it), and reaches the disk with the next synced commit, whose flush covers every
commit before it (SQLite's WAL and PostgreSQL's log are each written in
order). A non-streamed call's intent record is written so: its final record's
synced commit comes before the answer is released (docs/audit.md).

The queue is bounded: when the database stalls and the queue fills, new calls
are refused with 503 instead of buffering without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
import structlog

from gateway.audit.anchor import AnchorFile
from gateway.audit.chain import Chain, Signer
from gateway.audit.record import AuditRecord, row_of, system_record
from gateway.errors import AuditUnavailable
from gateway.hotpath import Batch, HotPath

log = structlog.get_logger("bastion.audit")
_CHECKPOINT_RETRY_SECONDS = 1.0


class _Pending(NamedTuple):
    row: dict[str, Any]
    payloads: Sequence[dict[str, Any]]
    done: asyncio.Future[None]
    synced: bool


class AuditWriter:
    def __init__(
        self,
        hot: HotPath,
        chain: Chain,
        anchor: AnchorFile,
        *,
        queue_max: int,
        batch_max: int,
        write_timeout: float = 10.0,
    ):
        self._hot = hot
        self.chain = chain
        self._anchor = anchor
        self._queue_max = queue_max
        self._batch_max = batch_max
        self._write_timeout = write_timeout
        self._pending: deque[_Pending] = deque()
        # Set while the writer waits for work; resolved by the next write (or close).
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # After a failed commit the database may or may not hold the batch.
        self._resync = False
        self._retry_at = 0.0

    @classmethod
    def for_process(
        cls, hot: HotPath, signer: Signer, anchor: AnchorFile, *, every: int, seconds: float, **kwargs: Any
    ) -> AuditWriter:
        """A writer with a fresh stream of its own."""
        return cls(hot, Chain(uuid.uuid4().hex, signer, every, seconds), anchor, **kwargs)

    @property
    def stream_id(self) -> str:
        return self.chain.stream_id

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def close(self) -> None:
        """Write what is queued, seal the stream with a closing record, then stop."""
        self._closing = True
        self._wake()
        if self._task is not None:
            await self._task

    async def write(self, record: AuditRecord, payloads: Sequence[dict[str, Any]] = (), *, synced: bool = True) -> None:
        """Return once the record (and its payload rows) is committed, and flushed
        to disk unless `synced` is False; raise AuditUnavailable otherwise."""
        if self._closing or self._task is None or self._task.done():
            raise AuditUnavailable(
                "The audit store is not accepting records; the call was refused.", audit_reason="writer_stopped"
            )
        if len(self._pending) >= self._queue_max:
            raise AuditUnavailable("The audit store is overloaded; the call was refused.", audit_reason="queue_full")
        loop = asyncio.get_running_loop()
        # Each caller has a future of its own, so one giving up (cancelled, or
        # timed out by the timer) touches nobody else's; the batch skips it.
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append(_Pending(row_of(record), payloads, done, synced))
        self._wake()
        timer = loop.call_later(self._write_timeout, _time_out, done)
        try:
            await done
        finally:
            timer.cancel()

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    await self._seal()
                    return
                await self._idle(self._idle_wait())
                # A checkpoint falls due with no new records. If it fails
                # (database down), it is retried after a pause, not in a loop.
                due = not self._pending and not self._closing and self._idle_wait() == 0
                if due and not await self._quietly(self._commit([])):
                    self._retry_at = time.monotonic() + _CHECKPOINT_RETRY_SECONDS
                continue
            batch = [self._pending.popleft() for _ in range(min(self._batch_max, len(self._pending)))]
            try:
                await self._commit(batch)
            except Exception as exc:  # any database or anchor failure fails these records, closed
                log.error("audit.write_failed", error=type(exc).__name__, detail=str(exc)[:200], records=len(batch))
                err = AuditUnavailable(
                    "The audit store refused the record; the call was refused.", audit_reason="write_failed"
                )
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(err)
                        # Nobody may be waiting any more (timeout); don't warn about it.
                        p.done.exception()
            else:
                for p in batch:
                    if not p.done.done():
                        p.done.set_result(None)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _idle(self, timeout: float | None) -> None:
        """Wait for the next write, or `timeout` seconds (a checkpoint falls due).

        A bare future and a timer, not `asyncio.wait_for`: that makes a task
        per wait, and with calls one at a time the writer waits once per record.
        """
        loop = asyncio.get_running_loop()
        self._wakeup = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._wake)
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    async def _commit(self, batch: list[_Pending], *, closing: bool = False) -> None:
        if self._anchor.behind:
            # Lines from an earlier batch never reached the anchor: nothing more
            # is accepted until they do (the trail would be unanchored).
            await asyncio.to_thread(self._anchor.append, ())
        if self._resync:
            tail = await self._hot.stream_tail(self.chain.stream_id)
            self.chain.resync(tail.seq, tail.head, tail.checkpointed)
            self._resync = False
        link = self.chain.link([p.row for p in batch], closing=closing)
        if not link.rows and not link.checkpoints:
            return
        checkpoints = [msgspec.structs.asdict(c) for c in link.checkpoints]
        payloads = [row for p in batch for row in p.payloads]
        # One record that must be on disk (or a signed checkpoint) syncs the batch.
        synced = bool(checkpoints) or any(p.synced for p in batch)
        try:
            await self._hot.write_batch(Batch(link.rows, checkpoints, payloads, synced=synced))
        except BaseException:
            self._resync = True
            raise
        self.chain.advance(link)
        if link.checkpoints:
            # On failure the anchor keeps the lines for the next batch, and
            # these callers get 503 although their records are committed.
            await asyncio.to_thread(self._anchor.append, link.checkpoints)

    async def _seal(self) -> None:
        if self.chain.seq == 0 and self.chain.checkpointed < 0:
            return  # this stream never wrote anything
        closing = system_record("audit.stream_closed", method="-", outcome="ok")
        sealed = _Pending(row_of(closing), (), asyncio.get_running_loop().create_future(), synced=True)
        await self._quietly(self._commit([sealed], closing=True))

    def _idle_wait(self) -> float | None:
        """Seconds until a timed checkpoint is due (None: nothing to checkpoint)."""
        due = self.chain.seconds_until_checkpoint()
        if due is None:
            return None
        return max(due, self._retry_at - time.monotonic(), 0.0)

    async def _quietly(self, commit: Any) -> bool:
        """A commit nobody waits on (timed checkpoints, the closing seal): log failures."""
        try:
            await commit
        except Exception as exc:
            log.error("audit.checkpoint_failed", error=type(exc).__name__, detail=str(exc)[:200])
            return False
        return True


def _time_out(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_exception(
            AuditUnavailable(
                "The audit store did not answer in time; the call was refused.", audit_reason="write_timeout"
            )
        )


async def write_quietly(writer: AuditWriter, record: AuditRecord, payloads: Sequence[dict[str, Any]] = ()) -> None:
    """For records whose caller cannot act on a failure (a stream already sent)."""
    with contextlib.suppress(AuditUnavailable):
        await writer.write(record, payloads)

"""The audit writer: the one place audit records reach SQL.

Callers `await writer.write(record)` and get control back only once the record
is committed (durable), or an `AuditUnavailable` error when it cannot be. One
background task takes whatever records are waiting and commits them in a single
transaction (group commit), so under load many calls share one fsync instead of
queueing behind each other. The queue is bounded: when the database stalls and
the queue fills, new calls are refused with 503 instead of buffering without
limit. A later stage (hash chain, signed checkpoints) hooks in here, in
`_commit`, where records are already in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from datetime import datetime
from typing import Any

import msgspec
import structlog

from gateway.errors import AuditUnavailable
from gateway.hotpath import HotPath

log = structlog.get_logger("bastion.audit")


class AuditRecord(msgspec.Struct, kw_only=True):
    """One row of `audit_records`. Field names match the columns."""

    request_id: str
    phase: str  # intent | final | system
    started_at: datetime
    method: str
    route: str
    ended_at: datetime | None = None
    auth_method: str | None = None
    key_id: str | None = None
    key_name: str | None = None
    team: str | None = None
    role: str | None = None
    client_addr: str | None = None
    model: str | None = None
    stream: bool = False
    outcome: str | None = None  # ok | refused | error | client_closed
    http_status: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    request_sha256: str | None = None
    response_sha256: str | None = None
    manifest_sha256: str | None = None
    detail: str | None = None


class AuditWriter:
    def __init__(self, hot: HotPath, *, queue_max: int, batch_max: int, write_timeout: float = 10.0):
        self._hot = hot
        self._queue_max = queue_max
        self._batch_max = batch_max
        self._write_timeout = write_timeout
        self._pending: deque[tuple[dict[str, Any], asyncio.Future[None]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def write(self, record: AuditRecord) -> None:
        """Return once the record is committed; raise AuditUnavailable otherwise."""
        if self._closing or self._task is None or self._task.done():
            raise AuditUnavailable(
                "The audit store is not accepting records; the call was refused.", audit_reason="writer_stopped"
            )
        if len(self._pending) >= self._queue_max:
            raise AuditUnavailable("The audit store is overloaded; the call was refused.", audit_reason="queue_full")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((msgspec.structs.asdict(record), done))
        self._wakeup.set()
        try:
            # shield: a caller that gives up must not cancel a batch others share.
            await asyncio.wait_for(asyncio.shield(done), self._write_timeout)
        except TimeoutError:
            raise AuditUnavailable(
                "The audit store did not answer in time; the call was refused.", audit_reason="write_timeout"
            ) from None

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._pending.popleft() for _ in range(min(self._batch_max, len(self._pending)))]
            try:
                await self._commit([row for row, _ in batch])
            except Exception as exc:  # any database failure fails these records, closed
                log.error("audit.write_failed", error=type(exc).__name__, records=len(batch))
                err = AuditUnavailable(
                    "The audit store refused the record; the call was refused.", audit_reason="write_failed"
                )
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                        # Nobody may be waiting any more (timeout); don't warn about it.
                        fut.exception()
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def _commit(self, rows: list[dict[str, Any]]) -> None:
        await self._hot.insert_audit(rows)


async def write_quietly(writer: AuditWriter, record: AuditRecord) -> None:
    """For records whose caller cannot act on a failure (a stream already sent)."""
    with contextlib.suppress(AuditUnavailable):
        await writer.write(record)

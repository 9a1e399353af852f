"""Auditor queries: filtered, keyset-paginated reads of the trail, exports and stats.

Pages run newest first on (started_at, id); the next page starts strictly after
the last row of this one (`(started_at, id) < cursor`), so page 1000 costs what
page 1 costs. Each filter on key, team or model has an index that begins with
that column and continues with (started_at, id) (migration 0003). Exports run
oldest first in the same keyset steps, so memory stays flat for any size.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.record import iso, stored_text
from gateway.errors import BadRequest
from gateway.tables import audit_payloads, audit_records
from gateway.utc import as_utc

EVENT_FIELDS: tuple[str, ...] = tuple(c.name for c in audit_records.columns)
Bucket = Literal["minute", "hour", "day"]
_SQLITE_BUCKETS = {"minute": "%Y-%m-%dT%H:%M:00Z", "hour": "%Y-%m-%dT%H:00:00Z", "day": "%Y-%m-%dT00:00:00Z"}


class QueryError(BadRequest):
    """A filter, cursor or parameter that cannot be used (HTTP 400, CLI exit 2)."""

    def __init__(self, message: str):
        super().__init__(message, audit_reason="invalid_query")


class EventFilter(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    key_id: str | None = None
    team: str | None = None
    model: str | None = None
    outcome: str | None = None  # ok | refused | error | client_closed
    status: Annotated[int, msgspec.Meta(ge=0, le=999)] | None = None  # HTTP status
    phase: str | None = None  # intent | final | system
    request_id: str | None = None
    since: datetime | None = None  # started_at >= since
    until: datetime | None = None  # started_at < until

    def clauses(self) -> list[sa.ColumnElement[bool]]:
        c = audit_records.c
        out: list[sa.ColumnElement[bool]] = []
        for name, column in (
            ("key_id", c.key_id),
            ("team", c.team),
            ("model", c.model),
            ("outcome", c.outcome),
            ("status", c.http_status),
            ("phase", c.phase),
            ("request_id", c.request_id),
        ):
            value = getattr(self, name)
            if value is not None:
                out.append(column == value)
        if self.since is not None:
            out.append(c.started_at >= self.since)
        if self.until is not None:
            out.append(c.started_at < self.until)
        return out

    def public(self) -> dict[str, Any]:
        return {
            k: (iso(v) if isinstance(v, datetime) else v)
            for k, v in msgspec.structs.asdict(self).items()
            if v is not None
        }


def _utc(value: datetime, name: str) -> datetime:
    try:
        return as_utc(value)
    except OverflowError:  # 0001-01-01T00:00+05:00 is before year 1 in UTC
        raise QueryError(f"{name} must be a time from year 1 to 9999 in UTC.") from None


_TEXT_FILTERS = ("key_id", "team", "model", "outcome", "phase", "request_id")


def parse_filter(params: dict[str, Any]) -> EventFilter:
    """A filter from query parameters (or CLI options), its values as the trail
    stores them: texts as `row_of` keeps them, times in UTC."""
    try:
        f = msgspec.convert(params, EventFilter, strict=False)
    except msgspec.ValidationError as exc:
        raise QueryError(f"Invalid filter: {exc}") from None
    texts = {n: stored_text(n, v) for n in _TEXT_FILTERS if isinstance(v := getattr(f, n), str)}
    times = {n: _utc(v, n) for n in ("since", "until") if (v := getattr(f, n)) is not None}
    return msgspec.structs.replace(f, **texts, **times)


# A spreadsheet runs a cell that starts with one of these as a formula
# (OWASP "CSV injection"); callers choose the model name, the route and what
# error messages echo, so a crafted request could plant one in an export.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cells(event: dict[str, Any]) -> dict[str, Any]:
    """A public event for a CSV row: text that would start a formula gets a leading `'`.

    The JSON and JSONL forms keep every value exactly (hash checks use those).
    """
    return {
        name: "'" + value if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value
        for name, value in event.items()
    }


def public_event(row: Any) -> dict[str, Any]:
    """A record as JSON-ready values (times in the one ISO form)."""
    m = row._mapping
    return {name: (iso(m[name]) if isinstance(m[name], datetime) else m[name]) for name in EVENT_FIELDS}


def _encode_cursor(row: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode([iso(row.started_at), row.id])).decode().rstrip("=")


_RowId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # a BIGINT


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        started, row_id = msgspec.json.decode(raw, type=tuple[datetime, _RowId])
    except (ValueError, msgspec.DecodeError):
        raise QueryError("Invalid cursor: pass back the next_cursor of the previous page unchanged.") from None
    return _utc(started, "The cursor's time"), row_id


@dataclass(frozen=True)
class Page:
    events: list[dict[str, Any]]
    next_cursor: str | None


async def page(engine: AsyncEngine, f: EventFilter, *, limit: int, cursor: str | None = None) -> Page:
    """One page, newest first."""
    if not 1 <= limit <= 1000:
        raise QueryError("limit must be between 1 and 1000.")
    c = audit_records.c
    q = sa.select(audit_records).where(*f.clauses())
    if cursor:
        started, row_id = _decode_cursor(cursor)
        q = q.where(sa.tuple_(c.started_at, c.id) < sa.tuple_(sa.literal(started, c.started_at.type), row_id))
    q = q.order_by(c.started_at.desc(), c.id.desc()).limit(limit + 1)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([public_event(r) for r in rows], _encode_cursor(rows[-1]) if more else None)


async def export(engine: AsyncEngine, f: EventFilter, *, chunk: int = 2000) -> AsyncIterator[dict[str, Any]]:
    """Every matching record, oldest first, read in keyset steps."""
    c = audit_records.c
    after: tuple[datetime, int] | None = None
    while True:
        q = sa.select(audit_records).where(*f.clauses())
        if after is not None:
            q = q.where(sa.tuple_(c.started_at, c.id) > sa.tuple_(sa.literal(after[0], c.started_at.type), after[1]))
        async with engine.connect() as conn:
            rows = (await conn.execute(q.order_by(c.started_at, c.id).limit(chunk))).all()
        for row in rows:
            yield public_event(row)
        if len(rows) < chunk:
            return
        after = (rows[-1].started_at, rows[-1].id)


class Chunk(NamedTuple):
    """Part of an export: its bytes, and how many whole records they hold (what
    an export that breaks off says it sent)."""

    data: bytes
    records: int


_CHUNK = 64 * 1024


async def encoded(rows: AsyncIterator[dict[str, Any]], fmt: Literal["jsonl", "csv"]) -> AsyncIterator[Chunk]:
    """An export's bytes, in chunks of about 64 KiB: JSON lines, or CSV with a header (`csv_cells`)."""
    count = 0
    if fmt == "jsonl":
        lines = bytearray()
        async for row in rows:
            lines += msgspec.json.encode(row)
            lines += b"\n"
            count += 1
            if len(lines) > _CHUNK:
                yield Chunk(bytes(lines), count)
                lines.clear()
                count = 0
        yield Chunk(bytes(lines), count)
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EVENT_FIELDS)
    writer.writeheader()
    async for row in rows:
        writer.writerow(csv_cells(row))
        count += 1
        if out.tell() > _CHUNK:
            yield Chunk(out.getvalue().encode(), count)
            out.seek(0)
            out.truncate()
            count = 0
    yield Chunk(out.getvalue().encode(), count)


async def call_records(engine: AsyncEngine, request_id: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every record of one call (intent, final) and its captured payload rows."""
    c = audit_records.c
    request_id = stored_text("request_id", request_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_records).where(c.request_id == request_id).order_by(c.id))).all()
        payloads = (
            await conn.execute(
                sa.select(audit_payloads)
                .where(audit_payloads.c.request_id == request_id)
                .order_by(audit_payloads.c.part)
            )
        ).all()
    return [public_event(r) for r in rows], list(payloads)


async def stats(engine: AsyncEngine, f: EventFilter, bucket: Bucket) -> list[dict[str, Any]]:
    """Calls and tokens per time bucket, model, team and outcome (final records only)."""
    if bucket not in _SQLITE_BUCKETS:
        raise QueryError("bucket must be minute, hour or day.")
    c = audit_records.c
    if engine.dialect.name == "sqlite":
        slot: sa.ColumnElement[Any] = sa.func.strftime(_SQLITE_BUCKETS[bucket], c.started_at)
    else:
        slot = sa.func.date_trunc(bucket, sa.func.timezone("UTC", c.started_at))
    slot = slot.label("bucket")
    q = (
        sa.select(
            slot,
            c.model,
            c.team,
            c.outcome,
            sa.func.count().label("calls"),
            sa.func.coalesce(sa.func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
            sa.func.coalesce(sa.func.sum(c.completion_tokens), 0).label("completion_tokens"),
        )
        .where(c.phase == "final", *f.clauses())
        .group_by(slot, c.model, c.team, c.outcome)
        .order_by(slot, c.model, c.team, c.outcome)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    return [
        {
            "bucket": r.bucket.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(r.bucket, datetime) else r.bucket,
            "model": r.model,
            "team": r.team,
            "outcome": r.outcome,
            "calls": r.calls,
            "prompt_tokens": int(r.prompt_tokens),
            "completion_tokens": int(r.completion_tokens),
        }
        for r in rows
    ]

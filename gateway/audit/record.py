"""One audit record: its fields, its canonical encoding and its hash.

The hash of a record covers every column except the database's own row id and
the hash itself, so changing any field a reader sees breaks it. The encoding is
a JSON array in a fixed field order (not an object, so key order cannot vary),
with timestamps written one way (`2026-11-24T23:45:12.123456Z`): the same
record read back from SQLite or PostgreSQL encodes to the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import msgspec
from sqlalchemy import String

from gateway.tables import audit_records

HASH_VERSION = "bastion-audit/v1"
GENESIS = "0" * 64  # the `prev_hash` of a stream's first record


class AuditRecord(msgspec.Struct, kw_only=True):
    """What the gateway knows about one event. Field names match the columns."""

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
    # Payload capture used for this call: none | hash | encrypted.
    capture: str | None = None
    detail: str | None = None


# The chain's own fields come first; then every record field, in declaration order.
CHAIN_FIELDS = ("stream_id", "seq", "prev_hash")
HASHED_FIELDS: tuple[str, ...] = CHAIN_FIELDS + AuditRecord.__struct_fields__

# Column widths, so a long value (a client's 10 kB "model" name) is cut to fit
# instead of failing the whole group commit on PostgreSQL.
_WIDTHS = {c.name: c.type.length for c in audit_records.columns if isinstance(c.type, String) and c.type.length}


def iso(value: datetime) -> str:
    """The one text form of a timestamp, `2026-11-24T23:45:12.123456Z`; naive values
    are UTC (SQLite drops the zone). isoformat is C code: this runs per record in verify."""
    if value.tzinfo is None:
        return value.isoformat(timespec="microseconds") + "Z"
    if value.utcoffset():
        value = value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")[:-6] + "Z"


def detail_text(detail: dict[str, Any] | None) -> str | None:
    """A record's `detail` column: the one JSON form of an event's details (keys sorted)."""
    return None if detail is None else msgspec.json.encode(detail, order="sorted").decode()


def new_request_id() -> str:
    """A request id: 32 hex digits laid out as a UUIDv7 (48 bits of Unix
    milliseconds, then random bits), so ids sort by time.

    Time order is what keeps the audit table's request_id index cheap: each
    insert lands on the index's last page, where random (v4) ids touch a page
    anywhere in it, so the writer's page cache had to hold the whole index to
    keep its speed (bench/audit_throughput.py, bench/suite's leak run).
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | rand
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return f"{value:032x}"


def system_record(
    route: str, *, method: str, at: datetime | None = None, detail: dict[str, Any] | None = None, **fields: Any
) -> AuditRecord:
    """An event the gateway or the CLI records of its own accord (phase `system`)."""
    return AuditRecord(
        request_id=new_request_id(),
        phase="system",
        started_at=at or datetime.now(UTC),
        method=method,
        route=route,
        detail=detail_text(detail),
        **fields,
    )


def row_of(record: AuditRecord) -> dict[str, Any]:
    """The record as a column dict, every string made storable as is."""
    row = msgspec.structs.asdict(record)
    for name, value in row.items():
        if type(value) is str:
            row[name] = stored_text(name, value)
    return row


def stored_text(column: str, value: str) -> str:
    """A string as the trail stores it in `column`: NUL (which PostgreSQL text
    cannot hold) as U+FFFD, cut to the column's width. Filters compare with it."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    width = _WIDTHS.get(column)
    return value[:width] if width and len(value) > width else value


_TIME_FIELDS = tuple(i + 1 for i, name in enumerate(HASHED_FIELDS) if name in ("started_at", "ended_at"))
_STREAM_FIELD = HASHED_FIELDS.index("stream") + 1


def canonical(values: Sequence[Any]) -> bytes:
    """Canonical bytes of a record given its values in HASHED_FIELDS order."""
    encoded = [HASH_VERSION, *values]
    for i in _TIME_FIELDS:
        if isinstance(encoded[i], datetime):
            encoded[i] = iso(encoded[i])
    # SQLite hands booleans back as 0/1.
    encoded[_STREAM_FIELD] = bool(encoded[_STREAM_FIELD])
    return msgspec.json.encode(encoded)


_hashed_values = itemgetter(*HASHED_FIELDS)


def hash_row(row: dict[str, Any]) -> str:
    """A record's hash (the verifier computes the same inline, from SQL rows)."""
    return hashlib.sha256(canonical(_hashed_values(row))).hexdigest()

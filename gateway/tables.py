"""SQL tables, as SQLAlchemy Core metadata.

The schema is created and changed only by Alembic migrations (`migrations/`);
this module describes it for queries and is checked against the migrations by
a test, so the two cannot drift apart.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    # The visible part of the key (`bst_<key_id>_<secret>`); safe to log and show.
    Column("key_id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("role", String(16), nullable=False),
    Column("team", String(200), nullable=False, server_default=""),
    # HMAC-SHA256 of the secret part under the gateway's pepper, hex.
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

audit_records = Table(
    "audit_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    # intent: written before the engine sees the call; final: the outcome.
    # A refused call has only a final record.
    Column("phase", String(16), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("auth_method", String(16), nullable=True),
    Column("key_id", String(32), nullable=True),
    Column("key_name", String(200), nullable=True),
    Column("team", String(200), nullable=True),
    Column("role", String(16), nullable=True),
    Column("client_addr", String(64), nullable=True),
    Column("method", String(8), nullable=False),
    Column("route", String(200), nullable=False),
    Column("model", String(200), nullable=True),
    Column("stream", Boolean, nullable=False, server_default="0"),
    # ok | refused | error | client_closed
    Column("outcome", String(16), nullable=True),
    Column("http_status", Integer, nullable=True),
    Column("error_type", String(64), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("latency_ms", Float, nullable=True),
    Column("request_sha256", String(64), nullable=True),
    Column("response_sha256", String(64), nullable=True),
    # The manifest digest of the model that served the call (or was verified).
    Column("manifest_sha256", String(64), nullable=True),
    # System events (phase "system"): a small JSON object of event details.
    Column("detail", Text, nullable=True),
    Index("ix_audit_records_request_id", "request_id"),
    Index("ix_audit_records_started_at", "started_at"),
    Index("ix_audit_records_key_id_started_at", "key_id", "started_at"),
)

# One row per gateway instance: /readyz proves the store is writable by
# updating it, without adding noise to the audit trail.
gateway_heartbeat = Table(
    "gateway_heartbeat",
    metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("beat_at", DateTime(timezone=True), nullable=False),
)

"""SQL tables, as SQLAlchemy Core metadata.

The schema is created and changed only by Alembic migrations (`migrations/`);
this module describes it for queries and is checked against the migrations by
a test, so the two cannot drift apart.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

metadata = MetaData()

# Key names and teams are recorded in every record of a key's calls: as wide
# here as there, so a key holds none the trail would have to cut.
LABEL_WIDTH = 200

api_keys = Table(
    "api_keys",
    metadata,
    # The visible part of the key (`bst_<key_id>_<secret>`); safe to log and show.
    Column("key_id", String(32), primary_key=True),
    Column("name", String(LABEL_WIDTH), nullable=False),
    Column("role", String(16), nullable=False),
    Column("team", String(LABEL_WIDTH), nullable=False, server_default=""),
    # HMAC-SHA256 of the secret part under the gateway's pepper, hex.
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    # Auditor keys only: may read captured payloads in plaintext (each read is audited).
    Column("can_decrypt", Boolean, nullable=False, server_default="0"),
    # Rotation (migration 0004): a new secret under the same key id; the one it
    # replaced is accepted until previous_expires_at (its hash is kept, so a
    # call with it is refused as `rotated_key` rather than `unknown_key`).
    Column("rotated_at", DateTime(timezone=True), nullable=True),
    Column("previous_secret_hash", String(64), nullable=True),
    Column("previous_expires_at", DateTime(timezone=True), nullable=True),
)

audit_records = Table(
    "audit_records",
    metadata,
    # 64-bit (on SQLite an INTEGER PRIMARY KEY is already 64-bit and must stay INTEGER).
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    # The hash chain (gateway.audit.chain): one stream per writing process,
    # numbered from 1; each record hashes all its fields and its predecessor's hash.
    # Nullable only for rows written before the chain existed (migration 0003).
    Column("stream_id", String(32), nullable=True),
    Column("seq", BigInteger, nullable=True),
    Column("prev_hash", String(64), nullable=True),
    Column("record_hash", String(64), nullable=True),
    Column("request_id", String(64), nullable=False),
    # intent: written before the engine sees the call; final: the outcome.
    # A refused call has only a final record.
    Column("phase", String(16), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("auth_method", String(16), nullable=True),
    Column("key_id", String(32), nullable=True),
    Column("key_name", String(LABEL_WIDTH), nullable=True),
    Column("team", String(LABEL_WIDTH), nullable=True),
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
    # Payload capture for this call: none | hash | encrypted (see audit_payloads).
    Column("capture", String(16), nullable=True),
    # System events (phase "system"): a small JSON object of event details.
    Column("detail", Text, nullable=True),
    Index("uq_audit_records_stream_seq", "stream_id", "seq", unique=True),
    Index("ix_audit_records_request_id", "request_id"),
    # Auditor queries page newest-first by (started_at, id), optionally narrowed
    # to one key, team or model: each has an index in exactly that order, so a
    # page is an index range scan however large the table grows.
    Index("ix_audit_records_started_at_id", "started_at", "id"),
    Index("ix_audit_records_key_started", "key_id", "started_at", "id"),
    Index("ix_audit_records_team_started", "team", "started_at", "id"),
    Index("ix_audit_records_model_started", "model", "started_at", "id"),
)

# Signed checkpoints: (stream, seq, hash, time) under the audit signing key.
# Also appended to the external anchor file (gateway.audit.anchor).
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("stream_id", String(32), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("record_hash", String(64), nullable=False),
    Column("signed_at", DateTime(timezone=True), nullable=False),
    # The stream's last checkpoint, written when its process stopped cleanly.
    Column("closed", Boolean, nullable=False, server_default="0"),
    Column("key_id", String(32), nullable=False),
    Column("signature", String(128), nullable=False),
    PrimaryKeyConstraint("stream_id", "seq", name="pk_audit_checkpoints"),
)

# Encrypted payloads (capture mode "encrypted"): AES-256-GCM under a keyring
# key; the chained record's request/response SHA-256 vouches for the plaintext.
audit_payloads = Table(
    "audit_payloads",
    metadata,
    Column("request_id", String(64), nullable=False),
    Column("part", String(16), nullable=False),  # request | response
    Column("key_id", String(32), nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("size", Integer, nullable=False),
    # The captured bytes stop at audit.capture_max_bytes.
    Column("truncated", Boolean, nullable=False, server_default="0"),
    PrimaryKeyConstraint("request_id", "part", name="pk_audit_payloads"),
)

# One row per gateway instance: /readyz proves the store is writable by
# updating it, without adding noise to the audit trail.
gateway_heartbeat = Table(
    "gateway_heartbeat",
    metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("beat_at", DateTime(timezone=True), nullable=False),
)

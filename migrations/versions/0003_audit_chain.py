"""Hash-chained audit records, signed checkpoints, encrypted payloads, auditor indexes.

Auditor queries page newest-first on (started_at, id), optionally narrowed to
one key, team or model; each gets an index in exactly that column order so the
first page and every next page (keyset: `(started_at, id) < cursor`) are index
range scans however large the table grows. `(stream_id, seq)` is unique: it is
the chain's order and what `audit verify` reads in.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # A 32-bit id runs out after 2**31 records: at 200 records/s, in four
        # months. (SQLite's INTEGER PRIMARY KEY is 64-bit already.)
        op.alter_column("audit_records", "id", type_=sa.BigInteger, existing_type=sa.Integer, existing_nullable=False)
        op.execute("ALTER SEQUENCE audit_records_id_seq AS bigint")
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("stream_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("seq", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("record_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("capture", sa.String(16), nullable=True))
        batch.drop_index("ix_audit_records_started_at")
        batch.drop_index("ix_audit_records_key_id_started_at")
    op.create_index("uq_audit_records_stream_seq", "audit_records", ["stream_id", "seq"], unique=True)
    op.create_index("ix_audit_records_started_at_id", "audit_records", ["started_at", "id"])
    op.create_index("ix_audit_records_key_started", "audit_records", ["key_id", "started_at", "id"])
    op.create_index("ix_audit_records_team_started", "audit_records", ["team", "started_at", "id"])
    op.create_index("ix_audit_records_model_started", "audit_records", ["model", "started_at", "id"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("stream_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed", sa.Boolean, nullable=False, server_default="0"),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("stream_id", "seq", name="pk_audit_checkpoints"),
    )
    op.create_table(
        "audit_payloads",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("part", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("truncated", sa.Boolean, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("request_id", "part", name="pk_audit_payloads"),
    )
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("can_decrypt", sa.Boolean, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("can_decrypt")
    op.drop_table("audit_payloads")
    op.drop_table("audit_checkpoints")
    for name in (
        "ix_audit_records_model_started",
        "ix_audit_records_team_started",
        "ix_audit_records_key_started",
        "ix_audit_records_started_at_id",
        "uq_audit_records_stream_seq",
    ):
        op.drop_index(name, "audit_records")
    op.create_index("ix_audit_records_started_at", "audit_records", ["started_at"])
    op.create_index("ix_audit_records_key_id_started_at", "audit_records", ["key_id", "started_at"])
    with op.batch_alter_table("audit_records") as batch:
        for column in ("capture", "record_hash", "prev_hash", "seq", "stream_id"):
            batch.drop_column(column)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER SEQUENCE audit_records_id_seq AS integer")
        op.alter_column("audit_records", "id", type_=sa.Integer, existing_type=sa.BigInteger, existing_nullable=False)

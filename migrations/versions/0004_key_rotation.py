"""API keys can be rotated: a new secret under the same key id, the old one kept for an overlap.

The key id stays, so the policy's per-key block, per-key rate limits and the
audit trail's `key_id` carry over unchanged; only the secret changes. The
previous secret's hash is kept, accepted until `previous_expires_at`,
so clients can move over without an outage.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("previous_secret_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("previous_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("previous_expires_at")
        batch.drop_column("previous_secret_hash")
        batch.drop_column("rotated_at")

"""Shared sessions: the connection state of coordinator processes that serve one federation together.

``sessions`` gains the wrapped channel keys, the two counters (last frame received, next reply sent)
and when a frame last authenticated; all NULL for a session one process keeps in memory.
``pending_handshakes`` holds each answered handshake's wrapped state until its CLIENT_FINISH takes it;
``hello_digests`` is the CLIENT_HELLO replay cache.  See ``qflare.protocol.shared_state``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("wrapped_keys", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("last_recv", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("next_send", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "pending_handshakes",
        sa.Column("hello_hash", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("hello_hash", name=op.f("pk_pending_handshakes")),
    )
    op.create_index(op.f("ix_pending_handshakes_expires_at"), "pending_handshakes", ["expires_at"], unique=False)
    op.create_table(
        "hello_digests",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_hello_digests")),
    )
    op.create_index(op.f("ix_hello_digests_expires_at"), "hello_digests", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_hello_digests_expires_at"), table_name="hello_digests")
    op.drop_table("hello_digests")
    op.drop_index(op.f("ix_pending_handshakes_expires_at"), table_name="pending_handshakes")
    op.drop_table("pending_handshakes")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("last_seen_at")
        batch.drop_column("next_send")
        batch.drop_column("last_recv")
        batch.drop_column("wrapped_keys")

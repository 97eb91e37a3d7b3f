"""Initial schema: devices, enrollment tokens, sessions, rounds, updates, model versions,
security events and the provenance ledger.

Written by hand to mirror ``qflare/storage/tables.py``; the storage tests compare the two with
Alembic's autogenerate and fail on any drift.

Revision ID: 0001
Revises:
Create Date: 2025-11-27 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _hash(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.String(length=128), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("sig_alg", sa.String(length=32), nullable=False),
        sa.Column("sig_public_key", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        _ts("enrolled_at"),
        _ts("revoked_at", nullable=True),
        sa.Column("revoked_reason", sa.Text(), nullable=True),
        sa.Column("enrollment_record", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("status IN ('active', 'revoked')", name=op.f("ck_devices_status")),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_devices")),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("used_at", nullable=True),
        sa.Column("used_by_device", sa.String(length=64), nullable=True),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_enrollment_tokens")),
    )
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("closed_at", nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_sessions_device_id_devices")),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_sessions")),
    )
    op.create_index(op.f("ix_sessions_device_id"), "sessions", ["device_id"], unique=False)
    op.create_table(
        "rounds",
        sa.Column("round_number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        _hash("base_model_hash"),
        sa.Column("selected_devices", sa.JSON(), nullable=False),
        sa.Column("min_participants", sa.Integer(), nullable=False),
        sa.Column("quorum", sa.Integer(), nullable=False),
        _ts("deadline"),
        _ts("opened_at"),
        _ts("closed_at", nullable=True),
        _hash("result_model_hash", nullable=True),
        sa.CheckConstraint("state IN ('open', 'aggregating', 'closed', 'failed')", name=op.f("ck_rounds_state")),
        sa.CheckConstraint("min_participants >= 1", name=op.f("ck_rounds_min_participants")),
        sa.CheckConstraint("quorum >= 1", name=op.f("ck_rounds_quorum")),
        sa.PrimaryKeyConstraint("round_number", name=op.f("pk_rounds")),
    )
    op.create_index(op.f("ix_rounds_state"), "rounds", ["state"], unique=False)
    op.create_table(
        "updates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        _hash("update_hash"),
        _hash("base_model_hash"),
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _ts("received_at"),
        sa.CheckConstraint("num_examples >= 0", name=op.f("ck_updates_num_examples")),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_updates_device_id_devices")),
        sa.ForeignKeyConstraint(["round_number"], ["rounds.round_number"], name=op.f("fk_updates_round_number_rounds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_updates")),
        sa.UniqueConstraint("round_number", "device_id", name=op.f("uq_updates_round_number_device_id")),
    )
    op.create_index(op.f("ix_updates_device_id"), "updates", ["device_id"], unique=False)
    op.create_table(
        "model_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=True),
        _hash("model_hash"),
        _hash("parent_hash", nullable=True),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["round_number"],
            ["rounds.round_number"],
            name=op.f("fk_model_versions_round_number_rounds"),
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_model_versions")),
    )
    op.create_index(op.f("ix_model_versions_model_hash"), "model_versions", ["model_hash"], unique=False)
    op.create_table(
        "security_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _ts("at"),
        sa.Column("device_id", sa.String(length=128), nullable=True),
        sa.Column("session_id", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_security_events")),
    )
    op.create_index(op.f("ix_security_events_at"), "security_events", ["at"], unique=False)
    op.create_table(
        "ledger_entries",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        _hash("prev_hash"),
        _hash("entry_hash"),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("entry_hash", name=op.f("uq_ledger_entries_entry_hash")),
    )


def downgrade() -> None:
    op.drop_table("ledger_entries")
    op.drop_index(op.f("ix_security_events_at"), table_name="security_events")
    op.drop_table("security_events")
    op.drop_index(op.f("ix_model_versions_model_hash"), table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index(op.f("ix_updates_device_id"), table_name="updates")
    op.drop_table("updates")
    op.drop_index(op.f("ix_rounds_state"), table_name="rounds")
    op.drop_table("rounds")
    op.drop_index(op.f("ix_sessions_device_id"), table_name="sessions")
    op.drop_table("sessions")
    op.drop_table("enrollment_tokens")
    op.drop_table("devices")

"""Secure aggregation: ``secagg_rounds`` holds the coordinator's state of an open secure round.

One row per secure round: its public configuration (JSON), ``SecAggServer.snapshot()`` (text), the
running sum of the masked inputs (bytes), the current phase's deadline, and ``unmasking_at``, stamped
before the masks are removed (a restart that finds it set fails the round: it never unmasks twice).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "secagg_rounds",
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("total", sa.LargeBinary(), nullable=False),
        sa.Column("phase_deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unmasking_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["round_number"], ["rounds.round_number"], name=op.f("fk_secagg_rounds_round_number_rounds")
        ),
        sa.PrimaryKeyConstraint("round_number", name=op.f("pk_secagg_rounds")),
    )


def downgrade() -> None:
    op.drop_table("secagg_rounds")

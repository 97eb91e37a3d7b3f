"""Store each update's exact signed UPDATE envelope, so every stored update signature re-verifies.

Updates stored before this revision keep a NULL envelope (only their signature was kept).

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-01 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("envelope", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("envelope")

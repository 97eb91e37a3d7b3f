"""Device quarantine: a third device status, ``quarantined``, with when and why.

Threat detection (docs/defences.md) quarantines a device whose reputation fell below the threshold; an
operator reinstates it.  A quarantined device keeps its key and sessions but is not selected and its
updates are refused.  Downgrading turns quarantined devices back into active ones.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_constraint(op.f("ck_devices_status"), type_="check")
        batch.create_check_constraint(op.f("ck_devices_status"), "status IN ('active', 'revoked', 'quarantined')")
        batch.add_column(sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("quarantine_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE devices SET status = 'active' WHERE status = 'quarantined'")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("quarantine_reason")
        batch.drop_column("quarantined_at")
        batch.drop_constraint(op.f("ck_devices_status"), type_="check")
        batch.create_check_constraint(op.f("ck_devices_status"), "status IN ('active', 'revoked')")

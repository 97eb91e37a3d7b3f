"""Alembic migrations for the QFLARE storage schema."""

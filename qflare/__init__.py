"""QFLARE."""

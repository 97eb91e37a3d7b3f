"""QFLARE coordinator server."""

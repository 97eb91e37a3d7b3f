"""Regenerate the error-code table of ``docs/protocol.md`` from :mod:`qflare.errors`.

``python -m qflare.errors_table`` prints the table; ``python -m qflare.errors_table docs/protocol.md``
rewrites the lines between the ``error-codes`` markers of that file in place.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import CODE_TABLE_BEGIN, CODE_TABLE_END, ConfigError, code_table_markdown

__all__ = ["replace_code_table"]


def replace_code_table(text: str) -> str:
    """``text`` with the lines between the two marker lines replaced by :func:`code_table_markdown`."""
    lines = text.splitlines(keepends=True)
    marks = [i for i, line in enumerate(lines) if line.strip() in (CODE_TABLE_BEGIN, CODE_TABLE_END)]
    if len(marks) != 2 or lines[marks[0]].strip() != CODE_TABLE_BEGIN:
        raise ConfigError(f"expected one {CODE_TABLE_BEGIN} line followed by one {CODE_TABLE_END} line")
    begin, end = marks
    return "".join(lines[: begin + 1]) + code_table_markdown() + "".join(lines[end:])


def main(argv: list[str]) -> int:
    if not argv:
        sys.stdout.write(code_table_markdown())
        return 0
    path = Path(argv[0])
    path.write_text(replace_code_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

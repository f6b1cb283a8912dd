"""CSV tables of result rows (per-epoch metrics, sweep trials, study runs), written atomically."""

from __future__ import annotations

import csv
from pathlib import Path

from sam_cache.outputs import atomic_write

__all__ = ["read_rows", "write_rows"]


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a CSV file as dicts of strings; ``[]`` when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(rows: list[dict], path: str | Path) -> None:
    """Write ``rows`` (columns: the union of their keys, in first-seen order) to ``path`` atomically.

    Raises:
      OutputError: the file cannot be written (the old one is kept).
    """
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)

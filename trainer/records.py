"""CSV tables of result rows (per-epoch metrics, sweep trials, study runs), written atomically, and
the run ledger that every driver of many runs resumes from."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from sam_cache.outputs import atomic_write

__all__ = ["read_rows", "write_rows", "RunLedger"]


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


class RunLedger:
    """The finished runs of a driver that trains many recipes on one store (``slca-train sweep``,
    ``slca-train study``, ``bench/defaults.py``, ``bench/stored_form.py``): one CSV row per run,
    rewritten atomically after each, so that an interrupted driver resumes where it stopped.

    Arguments:
      path: the CSV file (``runs.csv``, ``trials.csv``, ...); its rows are read if it exists.
      key: ``{column: type}``, the columns that name a run (``{"method": str, "fraction": float,
        "seed": int}``); a row read back from the file is compared after the types are applied.

    Raises:
      KeyError (in :meth:`record`): a row lacks a key column.
    """

    def __init__(self, path: str | Path, key: dict[str, Callable]):
        self.path, self.key = Path(path), dict(key)
        self.rows: list[dict] = read_rows(self.path)
        self._done = {self._key_of(r) for r in self.rows}

    def _key_of(self, row: dict) -> tuple:
        return tuple(cast(row[name]) for name, cast in self.key.items())

    def done(self, *key) -> bool:
        """Whether the run named by ``key`` (the key columns' values, in order) is recorded."""
        return tuple(cast(v) for cast, v in zip(self.key.values(), key)) in self._done

    def record(self, row: dict) -> None:
        """Append ``row`` and rewrite the file (the old one is kept if writing fails)."""
        self._done.add(self._key_of(row))
        self.rows.append(row)
        write_rows(self.rows, self.path)

    def __len__(self) -> int:
        return len(self.rows)

"""The CSV reader: one row per image (``path``, ``label``, optional ``split`` and group columns)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .entries import SPLIT_ALIASES, canonical_labels, expand, finish
from .manifest import DatasetError, DatasetManifest, DatasetOptions
from .registry import register_reader

__all__ = ["open_csv", "CSV_NAMES"]


CSV_NAMES = ("manifest.csv", "labels.csv")


def _claims(path: Path) -> Path | None:
    """A ``.csv`` file, or a folder that holds ``manifest.csv`` or ``labels.csv``."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return path
    if path.is_dir():
        return next((path / name for name in CSV_NAMES if (path / name).is_file()), None)
    return None


def _sample_source(root: str, sample_id: str) -> str:
    return os.path.join(os.path.dirname(root), sample_id)  # ids are relative to the CSV's folder


@register_reader("csv", _claims, _sample_source)
def open_csv(csv_path: Path, seed, val_fraction, test_fraction, options: DatasetOptions) -> DatasetManifest:
    """Read a CSV with path and label columns (renamed by ``options``), optional split and group columns."""
    pc, lc, sc = options.path_column, options.label_column, options.split_column
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first name
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DatasetError(f"{csv_path}: not a readable CSV: {exc}") from None
    gc = options.group_column
    need = [pc] + ([lc] if options.require_labels else []) + ([gc] if gc else [])
    missing = [c for c in need if c not in columns]
    if missing:
        raise DatasetError(f"{csv_path}: needs the column(s) {', '.join(repr(c) for c in missing)}, found {columns} "
                           "(rename them with --path-column / --label-column / --group-column)")
    has_labels = lc in columns
    entries, raw_labels, groups = [], [], []
    for line, row in enumerate(rows, start=2):
        if None in row.values() or None in row:
            raise DatasetError(f"{csv_path}, line {line}: the row has {len([v for v in row.values() if v is not None])} "
                               f"cells where the header has {len(columns)}")
        rel = (row[pc] or "").strip()
        if not rel:
            raise DatasetError(f"{csv_path}, line {line}: the {pc!r} cell is empty")
        label = (row[lc] or "").strip() if has_labels else None
        if has_labels and not label:
            raise DatasetError(f"{csv_path}, line {line}: the {lc!r} cell is empty")
        source = Path(rel) if Path(rel).is_absolute() else (csv_path.parent / rel).resolve()
        if not source.is_file():
            raise DatasetError(f"{csv_path}, line {line}: image {source} does not exist")
        split = (row.get(sc) or "").strip() or None
        if split is not None:
            if split.lower() not in SPLIT_ALIASES:
                raise DatasetError(f"{csv_path}, line {line}: unknown split {split!r}")
            split = SPLIT_ALIASES[split.lower()]
        group = (row[gc] or "").strip() if gc else None
        if gc and not group:
            raise DatasetError(f"{csv_path}, line {line}: the {gc!r} cell is empty")
        rel_id = Path(os.path.normpath(rel)).as_posix()
        for i, src in expand(rel_id, source, options):
            entries.append([i, label, split, src])
            raw_labels.append(label)
            groups.append(group)
    if has_labels:
        for e, lab in zip(entries, canonical_labels(raw_labels, str(csv_path))):
            e[1] = lab
    return finish(csv_path, "csv", [tuple(e) for e in entries], seed, val_fraction, test_fraction, options,
                   groups if gc else None)

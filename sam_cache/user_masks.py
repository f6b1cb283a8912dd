"""The user's own masks, brought into a store: ``samcache masks STORE --from-masks SOURCE``.

Many medical datasets ship lesion masks (BUSI, BUS-BRA, PH2, the ISIC segmentation sets). With
them, focus mode needs no decoder at all. A mask file is read, made binary (any non-zero pixel is
in the mask), and brought into the stored frame exactly as its image was: the longest side resized
to the store's image size with the same bilinear filter (then thresholded at half), zero padding
at the bottom and right. A mask whose size is not its image's original size is refused by name.

``SOURCE`` names one mask file per sample:

- ``csv:COLUMN``: a column of the dataset's own CSV (the one the store was extracted from), paths
  relative to the CSV like its image paths (BUS-BRA's manifest has a ``mask`` column);
- a folder that mirrors the dataset's layout, with ``--mask-name`` giving each file's name from its
  image's (default ``{stem}{suffix}``; BUSI's ``busi_masks/`` is ``{stem}_mask{suffix}``).

A sample whose mask file is missing is refused by name unless ``allow_missing``, which stores an
empty mask for it (an image with no lesion, such as BUSI's normal class, has an empty mask file).

The masks are stored as any mask set is (``--mask-set NAME``, :class:`sam_cache.store.MaskSet`), so
a store can hold them beside decoded ones, with their own signature:
``{"decoder": None, "prompt": "file", "source", "mask_name", "files_sha256", "version"}``;
``files_sha256`` hashes every mask file's bytes in row order, so a changed file is another mask
set. A rerun resumes; another source is refused unless ``overwrite``.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ConfigError
from .preprocess import pad_to_square, resized_shape
from .progress import progress as show_progress
from .store import DEFAULT_MASK_SET, EmbeddingStore, StoreError, check_mask_set_name

__all__ = ["import_masks", "mask_to_frame", "mask_paths"]

USER_MASKS_VERSION = 1


def mask_to_frame(mask: np.ndarray, size: int) -> np.ndarray:
    """A 2-D mask (any dtype; non-zero is in) in the stored ``size x size`` frame, as uint8 0/1.

    The same geometry as the stored image: longest side to ``size`` (PIL bilinear, thresholded at
    half), zero padding at the bottom and right.
    """
    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    h, w = resized_shape(m.shape[0], m.shape[1], size)
    if (h, w) != m.shape:
        m = np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR))
    return pad_to_square((m >= 128).astype(np.uint8), size)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a 2-D array (a colour mask is made grey first).

    Raises:
      ConfigError: the file cannot be read as an image.
    """
    try:
        with Image.open(path) as im:
            im.load()
            array = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I", "I;16") else im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"mask {path} cannot be read: {exc}") from None
    return array


def mask_paths(store: EmbeddingStore, source: str, mask_name: str = "{stem}{suffix}") -> list[str]:
    """The mask file of every row of ``store`` (see the module docstring for ``source``).

    Raises:
      ConfigError: a ``csv:`` source on a store not made from a CSV, a column it lacks, or a row
        of the store that the CSV does not list.
    """
    dataset = store.meta.get("dataset") or {}
    root, kind = dataset.get("root", ""), dataset.get("kind", "")
    if source.startswith("csv:"):
        column = source[4:]
        if kind != "csv":
            raise ConfigError(f"--from-masks {source}: store {store.path} was made from a {kind or 'non-CSV'} dataset; "
                              "give a folder of masks instead")
        with open(root, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns, rows = reader.fieldnames or [], list(reader)
        if column not in columns:
            raise ConfigError(f"--from-masks {source}: {root} has no column {column!r} (it has {columns})")
        ids = set(store.ids.tolist())
        # the path column is the one whose cells are the store's ids (extract's --path-column, whatever its name)
        path_column = next((c for c in columns
                            if ids <= {Path(os.path.normpath((r[c] or "").strip() or ".")).as_posix() for r in rows}),
                           None)
        if path_column is None:
            raise ConfigError(f"--from-masks {source}: no column of {root} lists the store's images (the CSV changed "
                              "since extraction?)")
        by_id = {}
        for row in rows:
            cell = (row[column] or "").strip()
            by_id[Path(os.path.normpath(row[path_column].strip())).as_posix()] = (
                str(Path(cell) if Path(cell).is_absolute() else Path(root).parent / cell) if cell else "")
        return [by_id[i] for i in store.ids]
    folder = Path(source)
    if not folder.is_dir():
        raise ConfigError(f"--from-masks {source}: not a folder, and not csv:COLUMN")
    out = []
    for i in store.ids:
        rel = Path(i.split("#", 1)[0])
        try:
            name = mask_name.format(stem=rel.stem, suffix=rel.suffix, name=rel.name)
        except (KeyError, IndexError) as exc:
            raise ConfigError(f"--mask-name {mask_name!r}: only {{stem}}, {{suffix}} and {{name}} are known ({exc})") \
                from None
        out.append(str(folder / rel.parent / name))
    return out


def _files_sha256(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.encode() + b"\0")
        if p and os.path.isfile(p):
            with open(p, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def import_masks(store_path: str | Path, source: str, mask_name: str = "{stem}{suffix}",
                 allow_missing: bool = False, overwrite: bool = False, batch_size: int = 32,
                 progress: bool = True, mask_set: str = DEFAULT_MASK_SET) -> dict:
    """Store one user mask per done sample of a store, in the images' frame; resumable.

    Arguments:
      store_path: a store with images.
      source: ``csv:COLUMN`` or a folder of masks (module docstring).
      mask_name: the file name of a mask in a folder source, from its image's ``{stem}``,
        ``{suffix}`` and ``{name}``.
      allow_missing: store an empty mask for a sample without a mask file (refused otherwise).
      overwrite: replace this set's masks of another signature.
      batch_size: masks written per step.
      progress: show a progress bar.
      mask_set: the mask set to write (e.g. ``gt``; :class:`sam_cache.store.MaskSet`).

    Returns:
      ``{"written", "already_done", "total", "empty", "missing"}``.

    Raises:
      ConfigError: a bad source; a missing mask file (without ``allow_missing``); a mask whose size
        is not its image's.
      StoreError: the store keeps no images, is read-only, or has masks of another signature; another
        run is writing this set now.
    """
    check_mask_set_name(mask_set)
    with EmbeddingStore.writer_lock(store_path, f"masks-{mask_set}"), EmbeddingStore.open(store_path, "r+") as store:
        if not store.has_images:
            raise StoreError(f"store {store_path} keeps no images, so masks have no frame to live in")
        paths = mask_paths(store, source, mask_name)
        rows = np.flatnonzero(store.done)
        missing = [int(k) for k in rows if not paths[k] or not os.path.isfile(paths[k])]
        if missing and not allow_missing:
            raise ConfigError(f"--from-masks {source}: no mask file for {len(missing)} sample(s), first "
                              f"{store.ids[missing[0]]} ({paths[missing[0]] or 'an empty cell'}); pass "
                              "--allow-missing to store empty masks for them")
        absent = set(missing)  # looked up once per row
        signature = {"decoder": None, "prompt": "file", "source": source, "mask_name": mask_name,
                     "files_sha256": _files_sha256(paths), "version": USER_MASKS_VERSION}
        ms = store.prepare_masks(signature, overwrite=overwrite, mask_set=mask_set)
        done_before = ms.done
        todo = rows[~done_before[rows]]
        r, empty = store.image_size, 0
        with show_progress("masks from files", len(todo), enabled=progress, unit="img") as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                masks = np.zeros((len(chunk), 1, r, r), dtype=np.uint8)
                boxes = np.zeros((len(chunk), 4), dtype=np.float32)  # no prompt made these masks
                for k, row in enumerate(chunk):
                    if int(row) in absent:
                        continue
                    m = read_mask(paths[row])
                    if tuple(m.shape[:2]) != tuple(int(v) for v in store.orig_size[row]):
                        raise ConfigError(f"mask {paths[row]} is {m.shape[0]}x{m.shape[1]}, but its image "
                                          f"{store.ids[row]} is {store.orig_size[row][0]}x{store.orig_size[row][1]}")
                    masks[k, 0] = mask_to_frame(m, r)
                empty += int((masks.reshape(len(chunk), -1).max(1) == 0).sum())
                ms.write(chunk, masks, np.ones(len(chunk), np.float32), boxes)
                bar.advance(len(chunk))
        return {"written": int(len(todo)), "already_done": int(done_before[rows].sum()), "total": int(len(rows)),
                "empty": empty, "missing": len(missing)}

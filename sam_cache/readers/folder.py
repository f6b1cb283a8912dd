"""The image-folder reader: ``ROOT/<split>/<class>/*``, ``ROOT/<class>/*``, or ``ROOT/*`` unlabelled."""

from __future__ import annotations

from pathlib import Path

from .entries import SPLIT_ALIASES, expand, finish, is_image
from .manifest import DatasetError, DatasetManifest, DatasetOptions
from .registry import register_reader

__all__ = ["open_folder"]


def _claims(path: Path) -> Path | None:
    return path if path.is_dir() else None


@register_reader("folder", _claims, fallback=True)
def open_folder(root: Path, seed, val_fraction, test_fraction, options: DatasetOptions) -> DatasetManifest:
    """Read ``ROOT/<split>/<class>/*``, ``ROOT/<class>/*`` or (unlabelled) ``ROOT/*`` images."""
    if options.group_column:
        raise DatasetError(f"dataset {root}: --group-column needs a CSV dataset (a folder has no group column)")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(filter(is_image, root.iterdir()))
    split_dirs = [p for p in subdirs if p.name.lower() in SPLIT_ALIASES]
    entries = []
    if loose and subdirs:
        raise DatasetError(f"dataset {root}: holds both images and folders; put images in class folders")
    if loose:  # unlabelled images (allowed for prediction only)
        for f in loose:
            entries += [(i, None, None, src) for i, src in expand(f.name, f, options)]
    elif split_dirs:
        if len(split_dirs) != len(subdirs):
            others = [p.name for p in subdirs if p not in split_dirs]
            raise DatasetError(f"dataset {root}: mixes split folders with other folders {others}")
        empty = []
        for split_dir in split_dirs:
            split = SPLIT_ALIASES[split_dir.name.lower()]
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                found = _class_files(root, class_dir, options)
                entries += [(i, class_dir.name, split, src) for i, src in found]
                empty += [] if found else [class_dir]
        _refuse_empty_classes(root, empty, entries)
    else:
        empty = []
        for class_dir in subdirs:
            found = _class_files(root, class_dir, options)
            entries += [(i, class_dir.name, None, src) for i, src in found]
            empty += [] if found else [class_dir]
        _refuse_empty_classes(root, empty, entries)
    return finish(root, "folder", entries, seed, val_fraction, test_fraction, options)


def _class_files(root: Path, class_dir: Path, options: DatasetOptions) -> list[tuple[str, str]]:
    """``(id, source)`` of every sample in a class folder."""
    found = []
    for f in sorted(filter(is_image, class_dir.iterdir())):
        found += expand(f.relative_to(root).as_posix(), f, options)
    return found


def _refuse_empty_classes(root: Path, empty: list[Path], entries: list) -> None:
    """A class folder with no readable image, beside ones with images, is refused: it would vanish
    from the classes, and the labels would change meaning without a word."""
    if not empty or not entries:
        return  # no images at all: "no images found" says it
    d = empty[0]
    others = sorted({p.suffix.lower() or p.name for p in d.iterdir() if not p.name.startswith(".")})
    what = f"only {', '.join(others[:5])} files" if others else "nothing"
    raise DatasetError(f"dataset {root}: class folder {d.relative_to(root).as_posix()} holds no image that samcache "
                       f"reads ({what}); add images, or remove the folder")

"""A dataset reader is one new module plus one registration: a toy reader registered here runs end to end."""

from pathlib import Path

import numpy as np
import pytest

from conftest import SPLIT_ARGS
from sam_cache import EmbeddingStore, extract_dataset
from sam_cache.readers import (READERS, DatasetError, DatasetOptions, create_reader, open_dataset, reader_kinds,
                               register_reader, sample_sources)
from sam_cache.readers.entries import expand, finish


def _claims(path: Path):
    return path if path.is_file() and path.suffix == ".toy" else None


def _open_toy(path: Path, seed, val_fraction, test_fraction, options: DatasetOptions):
    """A ``.toy`` file: one ``class<TAB>image path`` line per image, paths relative to the file."""
    entries = []
    for line in path.read_text().splitlines():
        label, rel = line.split("\t")
        entries += [(i, label, None, src) for i, src in expand(rel, path.parent / rel, options)]
    return finish(path, "toy", entries, seed, val_fraction, test_fraction, options)


@pytest.fixture
def toy_reader():
    register_reader("toy", _claims, lambda root, sample_id: f"toy:{root}:{sample_id}")(_open_toy)
    yield
    READERS.pop("toy")


def test_a_reader_registered_from_outside_reads_extracts_and_names_its_sources(toy_reader, sample_dir, tmp_path):
    files = sorted(p for p in sample_dir.rglob("*.png"))
    listing = tmp_path / "data.toy"
    listing.write_text("\n".join(f"{p.parent.name}\t{p}" for p in files))
    assert reader_kinds()[-1] == "folder" and "toy" in reader_kinds()  # the folder reader is still asked last
    assert create_reader(listing).reader.kind == "toy"
    manifest = open_dataset(listing, **SPLIT_ARGS)
    assert manifest.kind == "toy" and len(manifest) == len(files)
    assert set(manifest.class_names) == {p.parent.name for p in files}
    extract_dataset(listing, tmp_path / "s.zarr", "tiny", image_size=32, num_workers=0, progress=False, **SPLIT_ARGS)
    with EmbeddingStore.open(tmp_path / "s.zarr") as s:
        assert s.done.all() and s.meta["dataset"]["kind"] == "toy" and list(s.ids) == manifest.ids
        assert np.isfinite(s.read_rows(np.arange(len(s)))).all()
        assert sample_sources(s.meta["dataset"], s.ids[:1]) == [f"toy:{listing}:{s.ids[0]}"]


def test_a_kind_is_registered_once_and_unclaimed_paths_are_refused_by_name(toy_reader, tmp_path):
    with pytest.raises(ValueError, match="registered already"):
        register_reader("toy", _claims)(_open_toy)
    odd = tmp_path / "x.bin"
    odd.write_bytes(b"")
    with pytest.raises(DatasetError, match="x.bin: expected a folder.*toy"):
        open_dataset(odd)

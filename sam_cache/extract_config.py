"""Everything that decides an extraction, defined once: :class:`ExtractConfig`.

``samcache extract``'s options are generated from it (``cli/_options.py``), and
:func:`~sam_cache.extract.extract_dataset` checks every value when the config is made, before
anything touches the disk: a bad value fails with one line naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .encoders import list_encoders
from .errors import ConfigError
from .options import DEVICE_HELP, THREADS_HELP, Option, opt, options, validate_fields
from .preprocess import parse_window
from .readers import DatasetOptions

__all__ = ["ExtractConfig", "ReadingConfig", "extract_options", "reading_options"]

DTYPES = ("float16", "bfloat16", "float32", "int8")
_READ = DatasetOptions()  # the readers' defaults: the options' defaults are theirs, defined once
ATTENTIONS = ("auto", "sdpa", "flex", "stock")


@dataclass
class ReadingConfig:
    """How a dataset is read beyond its layout: the options of every command that reads one
    (``samcache extract``, ``slca-train predict``), defined here once."""

    path_column: str = opt(_READ.path_column, help="CSV column of image paths.")
    label_column: str = opt(_READ.label_column, help="CSV column of labels.")
    split_column: str = opt(_READ.split_column, help="CSV column of splits (optional in the file).")
    group_column: str | None = opt(_READ.group_column, help="CSV column of groups (patients): a group's images "
                                                            "always share a split, drawn or given (a leak is refused).")
    nifti_axis: int = opt(_READ.nifti_axis, low=0, high=2, help="NIfTI volumes: the axis slices are taken across.")
    nifti_slices: str = opt(_READ.nifti_slices, help="NIfTI volumes: all, middle or every:N slices.")

    def __post_init__(self) -> None:
        validate_fields(self)

    def dataset_options(self, **more):
        """The reader's :class:`~sam_cache.readers.DatasetOptions` for these options (``more``:
        its other fields, e.g. ``require_labels=False``).

        Raises:
          DatasetError: a ``nifti_slices`` that is not all, middle or every:N.
        """
        return DatasetOptions(**{f.name: getattr(self, f.name) for f in fields(ReadingConfig)}, **more)


@dataclass
class ExtractConfig(ReadingConfig):
    """The encoder, the stored form, the pipeline and the dataset reading of one extraction (the
    reading options are inherited from :class:`ReadingConfig`)."""

    encoder: str = opt("litemedsam", help=f"The registered encoders: {', '.join(list_encoders())} (tiny: tests only; "
                                          "the SAM 2 family needs the sam2 extra).")
    checkpoint: str | None = opt(None, help="Encoder weights file (required for SAM ViTs, medsam and the SAM 2 "
                                            "family).")
    random_weights: bool = opt(False, flag="--random-weights", help="Use seeded random weights (benchmarks only).")
    dtype: str = opt("float16", choices=DTYPES, help="Stored embedding dtype (int8: per-channel scales, half the size).")
    grid: int = opt(64, choices=(64, 32, 16, 8), help="Stored embedding grid: 64, or a compact grid made by average "
                                                      "pooling on the device (32: 0.5 MiB a sample in float16).")
    image_size: int = opt(224, low=0, help="Also store each image at this size in the embedding's frame; 0: don't.")
    batch_size: int = opt(8, low=1, help="Images per encoder batch.")
    num_workers: int = opt(2, low=0, flag="--workers", help="DataLoader processes that decode and resize.")
    device: str | None = opt(None, help=DEVICE_HELP)
    threads: int = opt(0, low=0, help=THREADS_HELP + "the embeddings exactly on this machine, whatever the load.")
    overwrite: bool = opt(False, flag="--overwrite", help="Delete an existing store (only a samcache store) and start "
                                                         "over (default: resume).")
    shard_size: int = opt(16, low=1, help="Samples per Zarr shard file.")
    block_size: int | None = opt(None, low=1, help="Rows per unit of torchrun work (a multiple of --shard-size).")
    window: str = opt("auto", help="Deep (16-bit, DICOM, NIfTI) images to 8 bits: auto, minmax or LO,HI.")
    seed: int = opt(0, help="Seed of the stratified split, for data without split folders.")
    val_fraction: float = opt(0.1, low=0.0, high=0.9, help="Validation fraction of a drawn split.")
    test_fraction: float = opt(0.2, low=0.0, high=0.9, help="Test fraction of a drawn split.")
    attention: str = opt("auto", choices=ATTENTIONS,
                         help="SAM ViT attention: sdpa (fused, dense relative-position bias), flex (relative "
                              "position inside the kernel), stock, or auto (sdpa on CUDA).")
    compile: bool = opt(False, flag="--compile", help="torch.compile the encoder.")
    progress: bool = opt(True, flag="--progress/--no-progress", help="Show progress: a bar on a terminal, a line every 30 s in a file or a pipe.")

    def __post_init__(self) -> None:
        validate_fields(self)
        parse_window(self.window)
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"val_fraction + test_fraction must be below 1; got {self.val_fraction} + "
                              f"{self.test_fraction}")
        if self.block_size is not None and self.block_size % self.shard_size:
            raise ConfigError(f"block_size {self.block_size} must be a multiple of shard_size {self.shard_size}")
        if self.encoder not in list_encoders():
            raise ConfigError(f"encoder must be one of {', '.join(list_encoders())}; got {self.encoder!r}")



def extract_options() -> list[Option]:
    """The leaf options of :class:`ExtractConfig`: its own in declaration order, then the reading ones."""
    reading = {o.name for o in reading_options()}
    every = options(ExtractConfig)
    return [o for o in every if o.name not in reading] + [o for o in every if o.name in reading]


def reading_options() -> list[Option]:
    """The leaf options of :class:`ReadingConfig` (how a dataset is read)."""
    return options(ReadingConfig)

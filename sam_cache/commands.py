"""The options of ``samcache``'s commands (``extract``'s are :class:`ExtractTarget` with :class:`ExtractConfig`).

One dataclass per command, one :func:`~sam_cache.options.opt` field per option: its type, default
and help are defined here once, and ``cli/`` generates the command from it (``cli/_options.py``,
:func:`command`). A field without a default is required; ``positional`` fields are arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from .options import DEVICE_HELP, THREADS_HELP, Checked, opt

__all__ = ["ExtractTarget", "ConvertOptions", "MasksOptions", "ExportOptions", "InfoOptions", "VerifyOptions"]

_PROGRESS = "Show progress: a bar on a terminal, a line every 30 s in a file or a pipe."


@dataclass(kw_only=True)
class ExtractTarget(Checked):
    """``samcache extract``'s dataset and store; the rest of its options are :class:`ExtractConfig`'s."""

    dataset: str = opt(help="Image folder (<split>/<class>/ or <class>/), CSV manifest or .npz.")
    out: str = opt(help="Store path: a .zarr folder (default format) or a .h5 file.")


@dataclass(kw_only=True)
class ConvertOptions(Checked):
    """``samcache convert STORE --out NEW``: :func:`sam_cache.convert_store`."""

    store: str = opt(help="The source store.", positional=True)
    out: str = opt(help="The new store (.zarr or .h5).")
    dtype: str | None = opt(None, help="Stored dtype: int8, float16, bfloat16 or float32 (default: int8, or the "
                                       "source's when --grid is given).")
    grid: int | None = opt(None, help="A compact grid: 32, 16 or 8 (average pooling; 32 in float16 is 0.5 MiB a "
                                      "sample). Default: the source's.")
    shard_size: int | None = opt(None, help="Samples per Zarr shard file (default: the source's).")
    overwrite: bool = opt(False, help="Delete an existing OUT first (default: resume it).", flag="--overwrite")
    progress: bool = opt(True, help=_PROGRESS)


@dataclass(kw_only=True)
class MasksOptions(Checked):
    """``samcache masks STORE``: :func:`sam_cache.masks.decode_masks`, or
    :func:`sam_cache.user_masks.import_masks` with ``--from-masks``."""

    store: str = opt(help="A store with images (samcache extract --image-size).", positional=True)
    prompt: str = opt("candidates", help="candidates (13 boxes, best predicted IoU), box (the whole image), csv "
                                         "(--boxes) or learned (--learn-from).")
    boxes: str | None = opt(None, help="CSV of boxes for --prompt csv: id,x0,y0,x1,y1 in image pixels.")
    checkpoint: str | None = opt(None, help="The encoder checkpoint the store was made with (SAM ViTs, medsam; "
                                            "litemedsam uses its packaged one).")
    threshold: float = opt(0.0, help="Mask logit threshold (0: probability 0.5).")
    batch_size: int = opt(16, help="Samples read and written per step.", low=1)
    device: str | None = opt(None, help=DEVICE_HELP)
    overwrite: bool = opt(False, help="Replace masks made differently (embeddings are kept).", flag="--overwrite")
    progress: bool = opt(True, help=_PROGRESS)
    threads: int = opt(0, low=0, help=THREADS_HELP + "the predicted IoUs and a learned head exactly on this machine, "
                                                     "whatever the load (not used by --from-masks).")
    from_masks: str | None = opt(None, help="Your own masks instead of a decoder: csv:COLUMN of the dataset's CSV, "
                                            "or a folder mirroring the dataset.")
    mask_name: str = opt("{stem}{suffix}", help="With a folder for --from-masks: a mask's file name from its image's "
                                                "{stem}, {suffix}, {name}.")
    allow_missing: bool = opt(False, help="With --from-masks: an empty mask where a sample has no mask file.",
                              flag="--allow-missing")
    split: str | None = opt(None, help="Decode only this split's rows (train, val, test).")
    mask_set: str = opt("default", help="The mask set to write; a store holds several (e.g. gt, learned), and "
                                        "training names one with --mask-set.")
    learn_from: str | None = opt(None, help="With --prompt learned: the mask set whose train-split masks the prompt "
                                            "is learned from.")
    learn_epochs: int = opt(30, help="With --prompt learned: epochs of the lesion head.")
    learn_seed: int = opt(0, help="With --prompt learned: the lesion head's seed.")
    learn_grow: float = opt(1.0, help="With --prompt learned: grid cells added around the predicted box.")
    learn_context: int = opt(3, help="With --prompt learned: dilated layers that widen what the lesion head sees "
                                     "(0-5; 3: 33x33 grid cells).")
    learn_presence: float | None = opt(None, help="With --prompt learned: an image whose lesion map never reaches "
                                                  "this probability gets an empty mask (no lesion) instead of a "
                                                  "decoded box (e.g. 0.5).")
    head_from: str | None = opt(None, help="With --prompt learned, instead of --learn-from: STORE:SET, the head "
                                           "another store's learned set keeps (e.g. masks for new images from the "
                                           "head learned on the training store).")


@dataclass(kw_only=True)
class ExportOptions(Checked):
    """``samcache export STORE --out FILE.npz``: :func:`sam_cache.export_pooled`."""

    store: str = opt(help="The store.", positional=True)
    out: str = opt(help="The .npz to write.")
    pooled: bool = opt(True, help="One pooled vector per sample (the only export so far).", flag="--pooled")
    stats: str = opt("mean", help="mean (256 per sample) or meanstd (512).")
    allow_partial: bool = opt(False, help="Export the done rows of an unfinished store.", flag="--allow-partial")


@dataclass(kw_only=True)
class InfoOptions(Checked):
    """``samcache info STORE``: :func:`sam_cache.summarize_store`."""

    store: str = opt(help="Store path.", positional=True)
    as_json: bool = opt(False, help="Print JSON for scripts.", flag="--json")


@dataclass(kw_only=True)
class VerifyOptions(Checked):
    """``samcache verify STORE``: :func:`sam_cache.verify_store`."""

    store: str = opt(help="Store path.", positional=True)

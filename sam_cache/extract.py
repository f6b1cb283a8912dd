"""The extraction pipeline: dataset -> frozen encoder -> embedding store, once, resumably.

Stages, overlapped:

1. DataLoader workers decode each image, window deep images to 8 bits, resize it into the
   encoder's frame and (optionally) into the stored training frame. A file that cannot be
   decoded comes back as an error string instead of a frame, so one bad file never stops a run.
   An image that decodes but holds no picture (:func:`~sam_cache.preprocess.image_problem`:
   one colour, or stripes) is stored, and named in the result and the store's ``suspect`` list.
2. The main thread moves uint8 frames to the device (pinned, non-blocking on CUDA), normalizes
   them there and runs the encoder under ``torch.inference_mode`` (bf16 autocast on CUDA).
3. A writer thread stores the rows and, after them, the ``done`` flags, while the next batch is
   encoded. Its queue is short, so a slow disk throttles the encoder instead of filling memory.

A rerun resumes: rows already marked done are skipped. Under ``torchrun`` each rank extracts its
own blocks of rows into the same store (:mod:`sam_cache.distributed`) and resumes its own. The store's signature must match the
encoder, checkpoint, preprocessing and dataset, or the run is refused (``overwrite`` starts over).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .readers import DatasetManifest, open_dataset
from .encoders import Encoder, EncoderError, create_encoder
from .fast_attention import use_fast_attention
from .progress import progress as show_progress
from .preprocess import ImageDecodeError, image_problem, load_frame, normalize_frames, resize_longest_side, pad_to_square, to_rgb_uint8, valid_grid
from . import distributed
from .errors import ConfigError
from .extract_config import ExtractConfig
from .threads import cpu_threads
from .store import EMBED_SHAPE, EmbeddingStore, StoreError, contiguous_runs, pool_to_grid, store_format
from .store.codec import high_res_dtype

__all__ = ["extract_dataset", "ExtractionResult"]


@dataclass
class ExtractionResult:
    """What a run did: rows written now, rows already done before, the images skipped, the
    stored images that look like no picture (``suspect``: index, id, source, problem), and whether
    a store left empty by a dead creator was made again (``recreated``)."""

    store_path: str
    total: int
    already_done: int
    written: int
    skipped: list[dict] = field(default_factory=list)
    suspect: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0
    recreated: bool = False

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _report(manifest: DatasetManifest, rows: np.ndarray, key: str, texts: np.ndarray) -> list[dict]:
    """One entry per row for the run's report (``skipped``, ``suspect``): index, id, source and ``key``."""
    return [{"index": int(i), "id": manifest.records[i].id, "source": manifest.records[i].source, key: str(t)}
            for i, t in zip(rows, texts)]


class _FrameDataset(Dataset):
    """Decodes rows of a manifest into encoder frames (and stored images) in worker processes."""

    def __init__(self, manifest: DatasetManifest, indices: np.ndarray, encoder_size: int, window: str,
                 image_size: int | None):
        self.manifest, self.indices = manifest, indices
        self.encoder_size, self.window, self.image_size = encoder_size, window, image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        index = int(self.indices[k])
        s, r = self.encoder_size, self.image_size or 0
        item = {"index": index, "error": "", "problem": "", "frame": torch.zeros(3, s, s, dtype=torch.uint8),
                "size": torch.zeros(2, dtype=torch.int64), "orig": torch.zeros(2, dtype=torch.int32),
                "window": torch.full((2,), float("nan")), "image": torch.zeros(3, r, r, dtype=torch.uint8)}
        try:
            array, dicom_window = self.manifest.read(index, self.window)
            rgb, applied = to_rgb_uint8(array, self.window, dicom_window)
            frame, size = load_frame(rgb, s)
            image = pad_to_square(resize_longest_side(rgb, r), r).transpose(2, 0, 1).copy() if r else None
        except Exception as exc:  # any per-image failure is a skipped image, named with its reason; never a crash
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            item["error"] = reason if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {reason}"
            return item
        item.update(problem=image_problem(rgb), frame=torch.from_numpy(frame), size=torch.tensor(size), orig=torch.tensor(rgb.shape[:2], dtype=torch.int32))
        if applied is not None:
            item["window"] = torch.tensor(applied, dtype=torch.float32)
        if image is not None:
            item["image"] = torch.from_numpy(image)
        return item


class _Writer:
    """One background thread that writes batches in order, then marks them done."""

    def __init__(self, store: EmbeddingStore, depth: int = 2):
        self.store, self.error = store, None
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._loop, name="samcache-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while (job := self.q.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure; the main thread raises it
            try:
                ready, indices, emb, orig, valid, window, images, high_res = job
                if ready is not None:
                    ready.synchronize()  # the device-to-host copy has landed
                for pos, start, stop in contiguous_runs(indices):
                    sl = slice(pos, pos + stop - start)
                    self.store.write_rows(start, emb[sl], orig[sl], valid[sl], window[sl],
                                          None if images is None else images[sl],
                                          None if high_res is None else [level[sl] for level in high_res])
                self.store.mark_done(indices)
            except BaseException as exc:  # surfaced in the main thread
                self.error = exc

    def submit(self, job):
        self._raise()
        self.q.put(job)

    def close(self):
        """Write what is queued, stop the thread, and raise the first write error, if any."""
        self.stop()
        self._raise()

    def stop(self):
        """Stop the thread after what is queued (idempotent; raises nothing)."""
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()

    def _raise(self):
        if self.error is None:
            return
        if getattr(self.error, "errno", None) == errno.ENOSPC or "No space left" in str(self.error):
            raise StoreError(f"writing to {self.store.path} failed: no space left on device. The rows stored "
                             "before it are kept; free some space and rerun to resume") from self.error
        first = str(self.error).splitlines()[0] if str(self.error) else type(self.error).__name__
        raise StoreError(f"writing to {self.store.path} failed: {first}") from self.error


def _to_pinned_host(t: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy of a device tensor into pinned host memory (wait on an event after it)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _refuse_dataset_overlap(manifest: DatasetManifest, out: str) -> None:
    """Refuse an output path that is, or holds, the dataset: writing or --overwrite would destroy it."""
    if "://" in out:
        return
    target = os.path.realpath(out)
    inside = target.rstrip(os.sep) + os.sep
    files = [manifest.root] + [r.file for r in manifest.records if r.file is not None]
    for f in files:
        real = os.path.realpath(f)
        if real == target or real.startswith(inside):
            raise StoreError(f"--out {out} holds the dataset ({f}); choose an output path outside it")
    root = os.path.realpath(manifest.root)
    if manifest.kind == "folder" and target.startswith(root.rstrip(os.sep) + os.sep):
        raise StoreError(f"--out {out} lies inside the dataset folder {manifest.root}, where the next run would read it "
                         "as a class or split folder; choose an output path outside it")


def extract_dataset(dataset: str | Path | DatasetManifest, out: str | Path, encoder: str | Encoder | None = None,
                    config: ExtractConfig | None = None, **options) -> ExtractionResult:
    """Run a frozen encoder over a dataset and store one embedding per image.

    Arguments:
      dataset: a path :func:`open_dataset` reads, or a manifest.
      out: the store path (``.zarr`` folder, fsspec URL, or ``.h5`` file).
      encoder: a registry name (default: the config's, ``litemedsam``), or a built
        :class:`Encoder` (benchmarks).
      config: an :class:`~sam_cache.extract_config.ExtractConfig`; or give its fields as keywords
        (``image_size=64, num_workers=0, ...``), checked the same way before anything is done.

    Returns:
      An :class:`ExtractionResult`; ``skipped`` lists images that could not be read (also kept
      in the store's attributes). Stored rows are never lost: a failure leaves every done row.

    Raises:
      ConfigError: a bad option (checked before any file is touched).
      StoreMismatchError: ``out`` exists with another signature (and not ``overwrite``).
      EncoderError, DatasetError, StoreError: bad encoder, dataset or store; or another
        extraction is writing ``out`` now (a local Zarr store is held for the whole run).
    """
    if config is None:
        name = encoder.name if isinstance(encoder, Encoder) else (encoder or "litemedsam")
        config = ExtractConfig(encoder=name, **options)
    elif options:
        raise ConfigError(f"pass either config or keyword options, not both ({', '.join(options)})")
    elif isinstance(encoder, str) and encoder != config.encoder:
        raise ConfigError(f"encoder {encoder!r} differs from the config's {config.encoder!r}")
    with cpu_threads(config.threads):
        return _extract(dataset, out, encoder, config)


def _extract(dataset, out, encoder, c: ExtractConfig) -> ExtractionResult:
    if not isinstance(encoder, Encoder):
        encoder = c.encoder
    checkpoint, random_weights, dtype, image_size = c.checkpoint, c.random_weights, c.dtype, c.image_size
    device, overwrite, shard_size, block_size, window = c.device, c.overwrite, c.shard_size, c.block_size, c.window
    manifest = dataset if isinstance(dataset, DatasetManifest) else open_dataset(
        dataset, seed=c.seed, val_fraction=c.val_fraction, test_fraction=c.test_fraction,
        options=c.dataset_options())
    if isinstance(encoder, str):
        encoder = create_encoder(encoder, checkpoint=checkpoint, random_weights=random_weights, window=window)
    image_size = image_size or None
    signature = dict(encoder.signature(), dtype=dtype, manifest_sha256=manifest.sha256(), image_size=image_size,
                     grid=c.grid)
    out = str(out)
    _refuse_dataset_overlap(manifest, out)
    want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    ctx = distributed.context("cuda" if want_cuda else "cpu")
    if ctx.world > 1 and store_format(out) == "hdf5":
        ctx.close()
        raise StoreError(f"{out}: distributed extraction needs a Zarr store; HDF5 has no parallel writes")
    dev = torch.device(f"cuda:{ctx.local_rank}" if want_cuda and ctx.world > 1 else (device or ("cuda" if want_cuda else "cpu")))

    # rank 0 creates (or checks) the store and holds it for the whole run: a second extraction into
    # it (a resume, or --overwrite) is refused while this one writes; the others open it once it is there
    error, recreated = None, False
    held = contextlib.ExitStack()
    if ctx.is_main:
        try:
            held.enter_context(EmbeddingStore.writer_lock(out, "extract"))  # before deleting or resuming it
            if overwrite and EmbeddingStore.exists(out):
                EmbeddingStore.remove(out)
            elif EmbeddingStore.abandoned_creation(out):  # it holds no row: nothing is lost
                EmbeddingStore.remove(out)
                recreated = True
            if EmbeddingStore.exists(out):
                with EmbeddingStore.open(out) as existing:
                    if existing.signature.get("manifest_sha256") == manifest.legacy_sha256():
                        signature["manifest_sha256"] = manifest.legacy_sha256()  # a store made by samcache 0.2.0
                    existing.check_signature(signature)
            else:
                EmbeddingStore.create(out, manifest.row_schema(), signature, dtype=dtype, image_size=image_size,
                                      shard_size=shard_size, block_size=block_size, grid=c.grid,
                                      high_res=encoder.high_res).close()
                held.close()  # the lock of a folder just removed, or none: hold the new store's
                held.enter_context(EmbeddingStore.writer_lock(out, "extract"))
        except StoreError as exc:
            error = exc
        except OSError as exc:  # a read-only folder, a full disk: say so in one line
            error = StoreError(f"cannot create store {out}: {exc.strerror or exc}")
    errors = ctx.gather(None if error is None else f"{type(error).__name__}: {error}")
    if errors[0] is not None:
        held.close()
        ctx.close()
        if error is not None:
            raise error
        raise StoreError(f"rank 0 could not prepare {out}: {errors[0]}")
    with held:
        return _extract_rows(manifest, out, encoder, c, ctx, dev, recreated)


def _extract_rows(manifest, out: str, encoder: Encoder, c: ExtractConfig, ctx, dev, recreated: bool) -> ExtractionResult:
    """Encode and store the rows this rank still owes (rank 0 holds the store's writer lock)."""
    batch_size, num_workers, dtype, image_size = c.batch_size, c.num_workers, c.dtype, c.image_size or None
    attention, progress = c.attention, c.progress
    store = EmbeddingStore.open(out, mode="r+")

    already = int(store.done.sum())
    mine = distributed.rank_row_mask(len(manifest), store.block_size, ctx.rank, ctx.world)
    pending = np.flatnonzero(~store.done & mine)
    result = ExtractionResult(out, len(manifest), already, 0, rank=ctx.rank, recreated=recreated)
    model = encoder.model.to(dev)
    if attention in ("sdpa", "flex") or (attention == "auto" and dev.type == "cuda"):
        use_fast_attention(model, "flex" if attention == "flex" else "sdpa")
    if c.compile:
        model = torch.compile(model)
    pre = encoder.preprocessing
    # int8 is quantized by the writer from float32, per sample and channel
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                   "int8": torch.float32}[dtype]

    loader = DataLoader(
        _FrameDataset(manifest, pending, pre.input_size, pre.window, image_size),
        batch_size=batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )
    writer = _Writer(store)
    t0 = time.perf_counter()
    finished = False
    try:
        with show_progress(f"extract {encoder.name}", len(pending), enabled=progress and ctx.is_main, unit="img") as bar:
            for batch in loader:
                ok = np.array([e == "" for e in batch["error"]])
                indices = batch["index"].numpy()
                result.skipped += _report(manifest, indices[~ok], "error", np.array(batch["error"])[~ok])
                odd = ok & np.array([p != "" for p in batch["problem"]])
                result.suspect += _report(manifest, indices[odd], "problem", np.array(batch["problem"])[odd])
                if ok.any():
                    sel = torch.from_numpy(ok)
                    frames = batch["frame"][sel].to(dev, non_blocking=True)
                    x = normalize_frames(frames, batch["size"][sel], pre)
                    with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
                        high_res = None
                        if encoder.high_res:  # SAM 2: the levels its mask decoder needs, kept beside
                            emb, high_res = model(x, high_res=True)
                        else:
                            emb = model(x)
                        if tuple(emb.shape[1:]) != EMBED_SHAPE:
                            raise EncoderError(f"encoder {encoder.name!r} gave {tuple(emb.shape[1:])} per image, not "
                                               f"the {EMBED_SHAPE} that every encoder must give")
                        emb = pool_to_grid(emb, c.grid).to(torch_dtype)  # compact grids pool on the device, before the copy
                        if high_res is not None:  # in the store's dtype on the device: half the copy for float16
                            high_res = [level.to(getattr(torch, high_res_dtype(dtype))) for level in high_res]
                    ready = None
                    if dev.type == "cuda":
                        emb, *high_res_host = [_to_pinned_host(t) for t in [emb] + list(high_res or [])]
                        high_res = high_res_host or None
                        ready = torch.cuda.Event()
                        ready.record()
                    else:
                        emb = emb.clone()
                        high_res = None if high_res is None else [level.clone() for level in high_res]
                    size = batch["size"][sel].numpy()
                    valid = np.array([valid_grid(h, w, pre.input_size) for h, w in size], dtype=np.int32)
                    images = batch["image"][sel].numpy() if image_size else None
                    writer.submit((ready, indices[ok], emb, batch["orig"][sel].numpy(), valid,
                                   batch["window"][sel].numpy(), images, high_res))
                    result.written += int(ok.sum())
                bar.advance(len(indices))
        writer.close()  # raises a write error (a full disk, say): those rows are not marked done
        finished = True
    finally:
        writer.stop()
        result.seconds = time.perf_counter() - t0
        try:
            # every rank's skipped images and counts; rank 0 records the report
            everyone = ctx.gather((result.skipped, result.written, result.suspect))
            result.skipped = sorted((s for skipped, _, _ in everyone for s in skipped), key=lambda s: s["index"])
            result.written = sum(w for _, w, _ in everyone)
            result.suspect = sorted((s for _, _, suspect in everyone for s in suspect), key=lambda s: s["index"])
            if ctx.is_main and writer.error is None:  # after a failed write (a full disk) no metadata is rewritten
                store.set_skipped(result.skipped)
                store.add_suspect(result.suspect, redone=pending)
            store.close()
        except Exception:
            if finished:
                raise  # otherwise the first error is already on its way out: do not hide it
        finally:
            ctx.barrier()
            ctx.close()
    return result

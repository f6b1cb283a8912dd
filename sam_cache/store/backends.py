"""The two formats a store lives in, behind one small interface: Zarr v3 folders and HDF5 files.

A backend holds arrays by name (``backend[name]``, ``name in backend``, ``create_array``,
``delete``), the ``samcache`` attributes (``get_meta``/``set_meta``) and ``flush``/``close``.
Only :mod:`sam_cache.store` uses them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from .schema import StoreError

__all__ = ["Backend", "ZarrBackend", "H5Backend", "open_backend", "store_format", "zarr_exists_error", "H5_META_COPY",
           "WRITER_LOCK", "writer_lock"]


def store_format(path: str | Path) -> str:
    """``"hdf5"`` for ``.h5``/``.hdf5``/``.hdf`` paths, else ``"zarr"``."""
    return "hdf5" if str(path).lower().endswith((".h5", ".hdf5", ".hdf")) else "zarr"


def _storage_options(path: str) -> dict | None:
    """fsspec options for a URL store: local ``file://`` folders are created as needed."""
    if "://" not in path:
        return None
    return {"auto_mkdir": True} if path.split("://", 1)[0] in ("file", "local") else {}


class Backend:
    """What both formats share: arrays by name under ``self.root`` (a zarr group or an h5py file)."""

    root = None
    path = ""
    writable = False  #: set from the open mode: ``"r"`` is read-only, every other mode writes

    def require_writable(self) -> None:
        """Refuse, naming the store, when it was opened read-only: the one check that every write
        of rows, masks or attributes passes (``change_meta`` calls it itself)."""
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only")

    def __getitem__(self, name):
        return self.root[name]

    def __contains__(self, name):
        return name in self.root

    def delete(self, name):
        del self.root[name]

    def meta_lock(self):
        """A context that holds the store's attributes for one read-change-write (none by default)."""
        return contextlib.nullcontext()

    def read_meta_now(self) -> dict:
        """The attributes as they are on disk now (another process may have written them since open)."""
        return self.get_meta()

    def change_meta(self, change) -> dict:
        """Apply ``change(meta)`` to the attributes as they are on disk now and write them, under
        :meth:`meta_lock`: two processes that each add a mask set to one store keep both (each
        writes what the other wrote, plus its own change). Returns the attributes written."""
        self.require_writable()
        with self.meta_lock():
            meta = self.read_meta_now()
            change(meta)
            self.set_meta(meta)
            self.flush()
        return meta


META_LOCK = ".samcache.lock"  # Zarr, local folders: the file that change_meta locks
WRITER_LOCK = ".samcache.{job}.lock"  # Zarr, local folders: the file a writing job holds while it runs


def _fcntl():
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    return fcntl


@contextlib.contextmanager
def held_lock_file(lock: str, blocking: bool = True):
    """Hold an exclusive ``flock`` on the file ``lock`` (created if absent) and yield the open
    file; remove the file before letting go, so that a store holds no lock file once its jobs end
    (zarr warns about every file in a group that is not part of the hierarchy). A process that was
    waiting on the file just removed finds it gone, or another in its place, and locks again; so
    two holders never overlap. A lock file left by a killed process is taken over and removed.

    Raises:
      BlockingIOError: ``blocking`` is False and another process holds the lock; the exception's
        ``holder`` attribute is what that process wrote in the file ("" if nothing).
    """
    fcntl = _fcntl()
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError as e:
            f.seek(0)
            e.holder = f.read().strip()
            f.close()
            raise
        if _same_file(f, lock):
            break
        f.close()  # the holder before us removed this file as it let go: lock the new one
    try:
        yield f
    finally:
        if _same_file(f, lock):  # not a file of the same name in a folder made again meanwhile
            with contextlib.suppress(OSError):
                os.unlink(lock)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _same_file(f, path: str) -> bool:
    """Whether the open file ``f`` is the file at ``path`` now."""
    try:
        on_disk = os.stat(path)
    except OSError:
        return False
    here = os.fstat(f.fileno())
    return (on_disk.st_ino, on_disk.st_dev) == (here.st_ino, here.st_dev)


class ZarrBackend(Backend):
    def __init__(self, path: str, mode: str, attributes: dict | None = None):
        import zarr

        self.path, self.writable = path, mode != "r"
        kwargs = {"attributes": attributes} if attributes is not None else {}
        self.root = zarr.open_group(path, mode=mode, zarr_format=3, storage_options=_storage_options(path), **kwargs)

    def create_array(self, name, shape, dtype, chunks, shards=None):
        kwargs = {"shards": shards} if shards else {}
        fill = "" if dtype is str else 0
        self.root.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=None, fill_value=fill, **kwargs)

    def get_meta(self) -> dict:
        return dict(self.root.attrs.get("samcache", {}))

    def read_meta_now(self) -> dict:
        import zarr  # the open group caches its attributes: read them through a fresh handle

        fresh = zarr.open_group(self.path, mode="r", zarr_format=3, storage_options=_storage_options(self.path))
        return dict(fresh.attrs.get("samcache", {}))

    @contextlib.contextmanager
    def meta_lock(self):
        """An exclusive ``flock`` on ``META_LOCK`` in a local store's folder (URL stores: none)."""
        fcntl = _fcntl()
        if "://" in self.path or fcntl is None:
            yield
            return
        with held_lock_file(os.path.join(self.path, META_LOCK)):
            yield

    def set_meta(self, meta: dict) -> None:
        self.root.attrs["samcache"] = meta

    def read_str(self, name) -> np.ndarray:
        return np.array(self.root[name][:].tolist(), dtype=str)

    def flush(self):
        pass

    def close(self):
        pass


H5_META_COPY = "meta_created"  # HDF5 only: the attributes as created, the fallback of a damaged attribute


class H5Backend(Backend):
    def __init__(self, path: str, mode: str):
        import h5py

        self.path, self.writable = path, mode != "r"
        # No chunk cache when writing: with one, HDF5 writes chunks out only when a dataset handle is
        # closed, and a full disk then surfaces as an ignored error in h5py's __dealloc__ after the
        # rows were marked done. Without it, every write reaches the file at once and raises.
        cache = {} if mode == "r" else {"rdcc_nbytes": 0}
        try:
            self.file = h5py.File(path, {"r": "r", "r+": "r+", "w": "w", "w-": "w-"}[mode], **cache)
        except FileExistsError:
            raise
        except OSError as exc:
            raise StoreError(h5_open_problem(path, mode, exc)) from exc
        self.root = self.file

    def create_array(self, name, shape, dtype, chunks, shards=None):
        import h5py

        if dtype is str:
            dtype = h5py.string_dtype()
        self.file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks if len(shape) > 1 or shape[0] else None)

    def get_meta(self) -> dict:
        """The ``samcache`` attribute; if it cannot be read (a rewrite that a full disk cut short),
        the creation record ``meta_created`` instead, with ``self.repaired`` set."""
        self.repaired = False
        try:
            raw = self.file.attrs.get("samcache")
        except (OSError, RuntimeError, KeyError) as exc:
            if H5_META_COPY not in self.file:
                raise StoreError(f"HDF5 store {self.path}: its samcache attribute cannot be read ({exc}) and the "
                                 "store has no creation record to repair it from (made before samcache 0.2.1)") from None
            self.repaired = True
            return json.loads(bytes(np.asarray(self.file[H5_META_COPY][:], dtype=np.uint8)).decode())
        return json.loads(raw) if raw is not None else {}

    def set_meta(self, meta: dict) -> None:
        """Write the attributes, refusing up front when the disk cannot hold them: HDF5 rewrites an
        attribute in place, and a rewrite cut short by a full disk leaves it unreadable."""
        text = json.dumps(meta)
        if self.path and "://" not in self.path:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
            if free < 4 * len(text) + (1 << 20):
                raise StoreError(f"HDF5 store {self.path}: no space left on device to update its attributes "
                                 f"({free} bytes free); nothing was changed. Free some space and rerun")
        self.file.attrs["samcache"] = text

    def record_creation(self, meta: dict) -> None:
        """Keep a copy of the creation-time attributes as a uint8 array, written once: what
        :meth:`get_meta` falls back to when the attribute is damaged."""
        self.file.create_dataset(H5_META_COPY, data=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))

    def read_str(self, name) -> np.ndarray:
        return np.asarray(self.file[name].asstr()[:], dtype=str)

    def flush(self):
        try:
            self.file.flush()
        except (OSError, RuntimeError) as exc:
            raise StoreError(f"writing HDF5 store {self.path} failed: {exc}") from exc

    def close(self):
        try:
            self.file.close()
        except (OSError, RuntimeError) as exc:
            raise StoreError(f"closing HDF5 store {self.path} failed: {exc}") from exc


def h5_open_problem(path: str, mode: str, exc: OSError) -> str:
    """The real reason an HDF5 file did not open, and what to do about it."""
    import errno as _errno

    text = str(exc)
    if "lock" in text.lower():
        return (f"HDF5 store {path} is locked by another process (is an extraction or a training run still "
                "using it?). Wait for it to finish; HDF5 allows one writer at a time")
    if getattr(exc, "errno", None) in (_errno.EACCES, _errno.EPERM, _errno.EROFS) or "ermission" in text \
            or "read-only" in text.lower():
        return f"HDF5 store {path} cannot be opened for {'writing' if mode != 'r' else 'reading'}: permission denied ({text})"
    return (f"HDF5 store {path} cannot be opened ({text}). A process killed while writing HDF5 can damage the "
            "file; if so, remove it yourself (--overwrite deletes only a file it can read as a store) and extract again, or use a Zarr store, which survives a kill")


@contextlib.contextmanager
def writer_lock(path: str | Path, job: str):
    """Hold the store at ``path`` for one writing job (``extract``, ``masks-SET``), refusing a second
    job of that name while it runs: an exclusive, non-blocking ``flock`` on ``.samcache.JOB.lock``
    in a local Zarr store's folder, held for the whole job and removed when it ends. The kernel
    lets go when the process ends, a SIGKILL included, so a killed job never leaves the store
    locked (its file stays until the next job on the store takes it over and removes it). The holder's pid, host
    and start time are written in the file for the refusal's message. Nothing is held for an HDF5
    file (HDF5 lets one writer open it, by its own lock), a URL store, or a path that is not a
    folder yet (creation is exclusive by itself).

    Raises:
      StoreError: another process holds the lock (it names that process); nothing was written.
    """
    path = str(path)
    fcntl = _fcntl()
    if "://" in path or fcntl is None or store_format(path) == "hdf5" or not os.path.isdir(path):
        yield
        return
    lock = os.path.join(path, WRITER_LOCK.format(job=job))
    entered = False
    try:
        with held_lock_file(lock, blocking=False) as f:
            entered = True
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                    f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}\n")
            f.flush()  # a full disk raises here, and the lock file is removed on the way out
            yield
    except BlockingIOError as e:
        if entered:  # raised by the job itself, not by the lock
            raise
        what = "extracted" if job == "extract" else f"written ({job})"
        raise StoreError(f"store {path} is being {what} by {e.holder or 'another process'}; two such runs "
                         "at once would write the same rows. Wait for it to finish (or stop it), then "
                         "rerun: it resumes") from None


def zarr_exists_error() -> type:
    """The exception zarr raises when ``mode="w-"`` finds something at the path."""
    from zarr.errors import ContainsGroupError

    return ContainsGroupError


def open_backend(path: str, mode: str) -> Backend:
    """The backend of ``path`` in ``mode`` (``r``, ``r+``): HDF5 for ``.h5`` paths, else Zarr."""
    return H5Backend(path, mode) if store_format(path) == "hdf5" else ZarrBackend(path, mode)

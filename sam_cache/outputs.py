"""Writing a command's outputs: atomically, and never over what the user did not ask to lose.

Every file that a samcache command writes outside a store (checkpoints, CSVs, JSON, plots, ``.npz``
exports) goes through :func:`atomic_write`: it is written to a temporary file beside its target and
renamed over it only when complete, so a full disk or a kill leaves the old file (or none), never a
half-written one. A failure is one :class:`OutputError` line that names the file and the cause
("no space left on device", "read-only file system").

Before a command writes, :func:`refuse_overlap` checks its output path against its inputs: an
output that *is* one of the command's inputs, or lies inside the dataset that a store was made
from, is refused (a run folder inside a class folder would become training images of that class).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Callable, Mapping

from .errors import SamcacheError

__all__ = ["OutputError", "atomic_write", "refuse_overlap", "describe_os_error", "dataset_folder"]


class OutputError(SamcacheError):
    """An output cannot be written where it was asked, or would destroy an input; ``cause`` is the
    one-line reason of a failed write ("no space left on device"), or None."""

    def __init__(self, message: str, cause: str | None = None):
        super().__init__(message)
        self.cause = cause


def describe_os_error(exc: BaseException) -> str:
    """A one-line cause: "no space left on device" (also for torch's ``unexpected pos``), etc."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "No space left" in text or "unexpected pos" in text:
        return "no space left on device"
    if code == errno.EROFS or "Read-only file system" in text:
        return "read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return getattr(exc, "strerror", None) or text


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(tmp)`` and a rename; returns ``path``.

    Arguments:
      path: the file to write; its folder is created when missing.
      write: writes the whole content to the path it is given (a temporary file in the same
        folder, with the same suffix, so that format-by-suffix writers such as ``savefig`` work).

    Raises:
      OutputError: the folder or the file cannot be written (the temporary file is removed, and
        an existing ``path`` is left as it was).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        cause = describe_os_error(exc)
        raise OutputError(f"cannot create folder {path.parent} for {path.name}: {cause}", cause) from None
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError, ValueError)):
            cause = describe_os_error(exc)
            raise OutputError(f"cannot write {path}: {cause}; an earlier {path.name}, if any, is kept", cause) from exc
        raise
    return path


def dataset_folder(meta: Mapping) -> str | None:
    """The folder that holds a store's dataset files (a CSV's folder; None for npz or URL data)."""
    dataset = meta.get("dataset") or {}
    root, kind = dataset.get("root"), dataset.get("kind")
    if not root or kind == "npz":
        return None
    return os.path.dirname(root) if kind == "csv" else root


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def refuse_overlap(out: str | Path, inputs: Mapping[str, str | Path | None], dataset: str | None = None,
                   what: str = "--out") -> None:
    """Refuse an output path that is one of the command's inputs, or lies inside its dataset.

    Arguments:
      out: the output path (a file or a folder).
      inputs: ``{"--checkpoint": path, ...}``: each input of the command by its option name.
      dataset: the dataset folder the inputs came from (:func:`dataset_folder`), if any.
      what: the output's option name, for the message.

    Raises:
      OutputError: naming the input that would be overwritten, or the dataset.
    """
    out = str(out)
    if "://" in out:
        return
    for name, path in inputs.items():
        if path is None or "://" in str(path):
            continue
        if os.path.realpath(out) == os.path.realpath(str(path)) or _within(str(path), out) or (
                os.path.isdir(str(path)) and _within(out, str(path))):
            raise OutputError(f"{what} {out} would overwrite the input {name} {path}; choose another {what}")
    if dataset and os.path.isdir(dataset) and _within(out, dataset):
        raise OutputError(f"{what} {out} lies inside the dataset {dataset}, whose files it would mix with (a run "
                          f"folder inside a class folder becomes training images); choose a {what} outside it")

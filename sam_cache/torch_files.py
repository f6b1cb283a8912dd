"""Reading a torch file safely, with one line that says why a file was refused.

Every checkpoint that samcache reads (encoder weights, a run's ``best.pt`` and ``last.pt``) is
loaded with ``torch.load(weights_only=True)``: tensors, containers and plain values only, so a
file can never run code. When torch refuses a file its message is several lines long and advises
loading with ``weights_only=False``, which samcache never does; :func:`load_weights_only` turns the
refusal into one line that names the cause instead.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .errors import SamcacheError
from .outputs import describe_os_error

__all__ = ["TorchFileError", "load_weights_only"]

_ZIP = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE = b"\x80"  # the legacy format: a pickle of protocol 2 or later
# torch words a refused object two ways: "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose module ..."
_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")


class TorchFileError(SamcacheError):
    """A file that :func:`load_weights_only` refused; the message is the cause, worded to follow the
    file's name ("is empty", "is not a torch file ..."); ``python_object`` names the class of a
    refused object ("argparse.Namespace"), or is None."""

    def __init__(self, message: str, python_object: str | None = None):
        super().__init__(message)
        self.python_object = python_object


def load_weights_only(path: str | Path, map_location="cpu"):
    """Read a torch file with ``weights_only=True``.

    Arguments:
      path: an existing file (the caller says what a missing one means).
      map_location: where tensors go (default the CPU).

    Returns:
      What the file holds: tensors, and dicts, lists and plain values of them.

    Raises:
      TorchFileError: the file is empty; is not a torch file (neither the zip archive of
        ``torch.save`` nor its legacy pickle: a text file, for example); holds a Python object
        besides tensors and plain values (it is never unpickled, so it cannot run code; the
        message names the object's class); or cannot be read for another reason (a truncated
        archive, a read error), with that cause.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise TorchFileError(f"cannot be read: {describe_os_error(exc)}") from None
    if not head:
        raise TorchFileError("is empty")
    if not (head.startswith(_ZIP) or head.startswith(_PICKLE)):
        raise TorchFileError(f"is not a torch file (torch.save writes a zip archive; this file starts with {head!r})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found:
            raise TorchFileError(f"holds a Python object ({found.group(1)}) besides tensors and plain values; "
                                 "samcache never unpickles objects, since that can run code",
                                 python_object=found.group(1)) from None
        raise TorchFileError("is not a torch file of tensors and plain values (its pickle was refused)") from None
    except Exception as exc:  # torch.load raises many kinds (RuntimeError, EOFError, KeyError...) for a damaged file
        raise TorchFileError(f"is not a readable torch file: {describe_os_error(exc)}") from None

"""The run folder's checkpoints: written atomically, read back without running code.

A checkpoint (``last.pt``, ``best.pt``) is a dict of tensors and plain Python values: the model's
and optimizer's state dicts, the epoch, the metric history, the resolved config, the class names
and the signature of the store trained on. It is read with ``torch.load(weights_only=True)``, so a
file with a pickled payload (``__reduce__``) is refused instead of run. Keep it that way: put no
numpy scalars, dataclasses or other objects into a checkpoint.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from sam_cache.outputs import OutputError, atomic_write, describe_os_error

from .errors import TrainError

__all__ = ["load_checkpoint", "save_checkpoint", "CHECKPOINT_KEYS"]

CHECKPOINT_KEYS = ("model", "config", "class_names", "store_signature")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename.

    A failure (a full disk, a read-only folder) leaves the old file as it was, removes the
    temporary file, and raises :class:`TrainError` naming the path and the cause.
    """
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OutputError as exc:
        raise TrainError(f"cannot write checkpoint {path}: {exc.cause}; the previous one, if any, is kept") from exc


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a samcache checkpoint safely.

    Arguments:
      path: ``best.pt`` or ``last.pt`` of a run folder.
      map_location: where tensors go (default the CPU).

    Returns:
      The checkpoint dict; it has at least :data:`CHECKPOINT_KEYS`.

    Raises:
      TrainError: the file is missing, empty, not a torch file, holds objects other than tensors
        and plain values (it may try to run code: it is never unpickled), or lacks the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise TrainError(f"checkpoint {path} is empty")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TrainError(f"checkpoint {path} holds objects that are not tensors or plain values, so it was not "
                         f"loaded (a samcache checkpoint never does): {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # torch.load raises many kinds (KeyError, RuntimeError, EOFError...) for a non-checkpoint
        raise TrainError(f"checkpoint {path} is not a readable torch checkpoint: {describe_os_error(exc)}") from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise TrainError(f"{path} is a torch file but not a samcache checkpoint (it lacks "
                         f"{', '.join(k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state)})")
    return state


"""The run folder's checkpoints: written atomically, read back without running code.

A checkpoint (``last.pt``, ``best.pt``) is a dict of tensors and plain Python values: the model's
and optimizer's state dicts, the epoch, the metric history, the resolved config, the class names
and the signature of the store trained on. It is read with ``torch.load(weights_only=True)``, so a
file with a pickled payload (``__reduce__``) is refused instead of run. Keep it that way: put no
numpy scalars, dataclasses or other objects into a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from sam_cache.outputs import OutputError, atomic_write
from sam_cache.torch_files import TorchFileError, load_weights_only

from .errors import TrainError

__all__ = ["RunCheckpoint", "load_checkpoint", "save_checkpoint", "CHECKPOINT_KEYS", "RESUME_KEYS"]

CHECKPOINT_KEYS = ("model", "config", "class_names", "store_signature")
#: what ``last.pt`` adds to ``best.pt``: the state a resumed run continues from
RESUME_KEYS = ("optimizer", "scheduler", "history", "best", "steps_per_epoch")


@dataclass
class RunCheckpoint:
    """The contract of ``best.pt`` and ``last.pt``: what a run saves, and what eval, predict,
    export and a resumed run read back, by attribute instead of by string key.

    On disk it stays a plain dict of these fields (old run folders load: a field that a file lacks
    reads as None). ``best.pt`` holds the model's fields; ``last.pt`` adds :data:`RESUME_KEYS`.

    Arguments:
      model: the classifier's state dict.
      config: the resolved :class:`~trainer.config.TrainConfig` as a dict.
      class_names: ``class_names[k]`` names logit ``k``.
      store_signature: the signature of the store trained on.
      epoch: the 0-based epoch the weights are from.
      masks_signature: the signature of the mask set a focus run read, else None.
      weights: where the backbone's starting weights came from (information).
      elapsed: wall-clock seconds the run had taken by the end of ``epoch``, the parts before a
        resume included (information; None in files written before it was recorded).
      optimizer, scheduler, history, best, steps_per_epoch: the resume state (``last.pt`` only).
    """

    model: dict
    config: dict
    class_names: list
    store_signature: dict
    epoch: int | None = None
    masks_signature: dict | None = None
    weights: dict | None = None
    elapsed: float | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    history: list | None = None
    best: dict | None = None
    steps_per_epoch: int | None = None

    @classmethod
    def from_dict(cls, state: dict, path: str | Path = "checkpoint") -> "RunCheckpoint":
        """A checkpoint dict as read from ``path``; unknown keys are ignored.

        Raises:
          TrainError: a key of :data:`CHECKPOINT_KEYS` is missing, or class names or the store
            signature are of the wrong kind.
        """
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise TrainError(f"{path} is a torch file but not a samcache checkpoint (it lacks {', '.join(missing)})")
        names, signature = state["class_names"], state["store_signature"]
        if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
            raise TrainError(f"checkpoint {path}: class_names must be a list of at least 2 names; got {names!r:.80}")
        if not isinstance(signature, dict):
            raise TrainError(f"checkpoint {path}: store_signature must be a mapping; got {type(signature).__name__}")
        return cls(**{f.name: state.get(f.name) for f in fields(cls)})

    def to_dict(self, resume: bool = True) -> dict:
        """The dict that is saved: every field, or without :data:`RESUME_KEYS` (``best.pt``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return out if resume else {k: v for k, v in out.items() if k not in RESUME_KEYS}

    @property
    def resumable(self) -> bool:
        """Whether it holds the state a resumed run needs (``last.pt``)."""
        return all(getattr(self, k) is not None for k in RESUME_KEYS) and self.epoch is not None


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` (a dict: :meth:`RunCheckpoint.to_dict`, or a plain state dict) to ``path``
    through a temporary file and a rename.

    A failure (a full disk, a read-only folder) leaves the old file as it was, removes the
    temporary file, and raises :class:`TrainError` naming the path and the cause.
    """
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OutputError as exc:
        raise TrainError(f"cannot write checkpoint {path}: {exc.cause}; the previous one, if any, is kept") from exc


def load_checkpoint(path: str | Path, map_location="cpu") -> RunCheckpoint:
    """Read a samcache checkpoint safely.

    Arguments:
      path: ``best.pt`` or ``last.pt`` of a run folder.
      map_location: where tensors go (default the CPU).

    Returns:
      The :class:`RunCheckpoint`.

    Raises:
      TrainError: the file is missing, empty, not a torch file, holds objects other than tensors
        and plain values (it may try to run code: it is never unpickled; the message names the
        object's class), or is not a run's
        checkpoint (see :meth:`RunCheckpoint.from_dict`).
    """
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        state = load_weights_only(path, map_location=map_location)
    except TorchFileError as exc:
        raise TrainError(f"checkpoint {path} {exc}") from None
    return RunCheckpoint.from_dict(state, path)


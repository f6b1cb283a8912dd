"""The step budget and the data order of a run: which rows each step sees, and the learning-rate
schedule. Nothing here depends on the model, so paired runs of one seed see the same batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import TrainError
from .stream import shard_order

__all__ = ["epoch_order", "StepPlan", "plan_steps", "warmup_cosine"]


def epoch_order(rows: np.ndarray, seed: int, pass_index: int, shards: tuple[int, int] | None = None
                ) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Pass ``pass_index``'s shuffled rows, and its stream buffers.

    Arguments:
      rows: the training rows.
      seed, pass_index: what the order depends on.
      shards: ``(shard_size, buffer_shards)`` for a shard-sequential order
        (:func:`trainer.stream.shard_order`); None for a global permutation.

    Returns:
      ``(order, groups)``; ``groups`` is None for a global permutation.
    """
    rng = np.random.default_rng([seed, pass_index])
    if shards is None:
        return rng.permutation(rows), None
    return shard_order(rows, shards[0], shards[1], rng)


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a pass, an epoch and the run take."""

    steps_per_pass: int
    steps_per_epoch: int
    epochs: int

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs


def plan_steps(n_train: int, global_batch: int, world: int, epochs: int, min_steps: int,
               steps_per_epoch: int | None = None) -> StepPlan:
    """The step plan; ``steps_per_epoch`` pins an existing run's (resume keeps it).

    A pass drops a last batch smaller than 2 samples per rank (BatchNorm cannot train on one).

    Raises:
      TrainError: too few training samples for one batch of 2 per rank.
    """
    per_pass = math.ceil(n_train / global_batch)
    if per_pass and n_train - (per_pass - 1) * global_batch < 2 * world:
        per_pass -= 1
    if per_pass < 1:
        raise TrainError(f"{n_train} training sample(s) cannot make one batch of at least 2 per rank")
    spe = steps_per_epoch or max(per_pass, math.ceil(min_steps / epochs))
    return StepPlan(per_pass, spe, epochs)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor at a step: linear warmup over ``warmup`` steps, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor

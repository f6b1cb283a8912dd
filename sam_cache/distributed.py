"""torch.distributed for extraction under ``torchrun``: who am I, and which rows are mine.

``torchrun --nproc-per-node N -m cli.samcache extract ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. :func:`context` joins the process group (NCCL on CUDA,
gloo on CPU). Rows are dealt out in *blocks* (a store attribute; a whole number of Zarr shards,
and the chunk of every small per-sample array), block ``b`` to rank ``b % world``, so ranks write
disjoint files of one store and never the same chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistContext", "context", "rank_row_mask"]


@dataclass
class DistContext:
    """This process's rank and the world size; ``owns_group`` if :func:`context` created it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (just ``[obj]`` in one process)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks, on the device (no host sync); ``value`` in one process."""
        if self.world == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world

    def all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (so that all ranks stop together)."""
        ok = torch.isfinite(value.detach()).all().float().reshape(1)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def context(device_type: str = "cpu") -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); else one process."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def rank_row_mask(n: int, block: int, rank: int, world: int) -> np.ndarray:
    """Boolean mask of the ``n`` rows that ``rank`` of ``world`` extracts (block ``b`` -> ``b % world``)."""
    return (np.arange(n) // block) % world == rank

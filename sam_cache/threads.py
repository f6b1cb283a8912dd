"""How many CPU threads torch uses for one job: :func:`cpu_threads`.

A CPU kernel that splits a reduction over threads adds in an order set by the thread count, so a
run on 2 threads and one on 8 differ in the last bits, and a chaotic training run amplifies them.
With one count fixed (``--threads``), a seed's run repeats exactly on one machine, whatever its
load and core count; another CPU (another instruction set) or another torch build may still
differ in the last bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["cpu_threads"]


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the count after it.

    Arguments:
      n: the thread count; 0 leaves torch's own (one per core, or ``OMP_NUM_THREADS``).

    Raises:
      ValueError: a negative ``n``.
    """
    if n < 0:
        raise ValueError(f"threads must be 0 (torch's default) or more; got {n}")
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)

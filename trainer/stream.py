"""Shard-sequential streaming with a shuffle buffer, for stores larger than host memory.

When a run's embeddings fit neither GPU nor host memory, reading random rows per batch turns
every sample into a seek into a different shard file. Instead, an epoch visits the store's shards
in a random order, a few at a time: :func:`shard_order` groups the shuffled shards into buffers
of ``buffer_shards`` shards and shuffles the samples inside each buffer (the webdataset habit).
:class:`ShardStream` reads each buffer with one sorted, contiguous read per shard, on a
background thread, one buffer ahead of training, and hands batches out of memory.

The order depends only on the seed, the epoch, the shard size and the buffer size, never on the
model or on the residency, so ``--no-slca`` (which holds only images, often in memory) sees the
same batches as the SLCA run that streams.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["shard_order", "ShardStream"]


def shard_order(rows: np.ndarray, shard_size: int, buffer_shards: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Shuffle ``rows`` shard by shard: buffers of whole shards, shuffled inside each buffer.

    Arguments:
      rows: the store rows of the epoch (any order, unique).
      shard_size: rows per shard file of the store (``store.meta["shard_size"]``).
      buffer_shards: shards held at once; the shuffle buffer is about
        ``buffer_shards * shard_size`` samples.
      rng: the epoch's generator (it then goes on to draw the augmentations).

    Returns:
      ``(order, groups)``: the epoch's rows in training order, and the same rows cut into the
      buffers that :class:`ShardStream` reads one at a time (``np.concatenate(groups) == order``).

    Raises:
      ValueError: ``shard_size`` or ``buffer_shards`` below 1.
    """
    if shard_size < 1 or buffer_shards < 1:
        raise ValueError(f"shard_size ({shard_size}) and buffer_shards ({buffer_shards}) must be at least 1")
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    shard_of = rows // shard_size
    shards = rng.permutation(np.unique(shard_of))
    groups = []
    for start in range(0, len(shards), buffer_shards):
        members = rows[np.isin(shard_of, shards[start:start + buffer_shards])]
        groups.append(rng.permutation(members))
    order = np.concatenate(groups) if groups else rows[:0]
    return order, groups


class ShardStream:
    """Serves batches of one epoch from buffers of whole shards, read one buffer ahead.

    Arguments:
      read: ``read(sorted_rows) -> (images, embeddings or None)`` as tensors on the host, e.g.
        two :meth:`EmbeddingStore.read_rows` calls; it runs on a background thread.
      groups: the epoch's buffers from :func:`shard_order`, in order.
      pin: pin each buffer's memory (CUDA training) so copies to the GPU do not block.

    A batch may straddle two buffers; a buffer is dropped once a batch needs only later ones.
    """

    def __init__(self, read, groups: list[np.ndarray], pin: bool = False):
        self._read, self.groups, self.pin = read, groups, pin
        self.owner = {int(r): g for g, rows in enumerate(groups) for r in rows}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="samcache-stream")
        self._pending: dict[int, Future] = {}
        self._loaded: dict[int, tuple[dict[int, int], torch.Tensor, torch.Tensor | None]] = {}
        self.buffers_read = 0
        self._submit(0)

    def _load(self, g: int):
        rows = np.sort(self.groups[g])
        img, emb = self._read(rows)
        if self.pin:
            img = img.pin_memory()
            emb = emb.pin_memory() if emb is not None else None
        return {int(r): k for k, r in enumerate(rows)}, img, emb

    def _submit(self, g: int) -> None:
        if 0 <= g < len(self.groups) and g not in self._pending and g not in self._loaded:
            self._pending[g] = self._pool.submit(self._load, g)

    def _buffer(self, g: int):
        if g not in self._loaded:
            self._submit(g)
            self._loaded[g] = self._pending.pop(g).result()
            self.buffers_read += 1
        self._submit(g + 1)  # read the next buffer while this one trains
        return self._loaded[g]

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images and embeddings (None when the reader gives none) of ``rows``, in that order.

        Raises:
          KeyError: a row that is not in this epoch's buffers.
        """
        try:
            owners = [self.owner[int(r)] for r in rows]
        except KeyError as exc:
            raise KeyError(f"row {exc.args[0]} is not in this epoch's stream") from None
        for g in [g for g in self._loaded if g < min(owners)]:
            del self._loaded[g]
        bufs = {g: self._buffer(g) for g in sorted(set(owners))}
        img = torch.stack([bufs[g][1][bufs[g][0][int(r)]] for r, g in zip(rows, owners)])
        has_emb = next(iter(bufs.values()))[2] is not None
        emb = torch.stack([bufs[g][2][bufs[g][0][int(r)]] for r, g in zip(rows, owners)]) if has_emb else None
        return img, emb

    def close(self) -> None:
        """Stop reading ahead and free the buffers."""
        for f in self._pending.values():
            f.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        self._loaded.clear()
